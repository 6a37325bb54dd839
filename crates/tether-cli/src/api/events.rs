//! Live events: `GET /api/events` (Server-Sent Events) carries, after the most recent few,
//! registrations, updates,
//! de-registrations and expiries, DTLS sessions opening, being replaced, moving and closing,
//! and every notification of the observations started through the API, as they happen.
//! Observations also keep their latest notifications for `GET /api/observations/{id}`.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::{json, Value};
use tether::lwm2m::{DeviceResponse, Lwm2mServer, SessionEvent};
use tether_coap::model::Models;
use tether_coap::registration::{Registration, RegistryEvent};
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};

use super::Api;

/// One event for `/api/events`: its SSE event name and JSON data.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    name: &'static str,
    data: Value,
}

/// Events kept for slow SSE readers before they miss some (they are told how many).
const LIVE_BACKLOG: usize = 1024;
/// The most recent events, sent to a reader when it connects (a page opened after a
/// registration still shows it).
const RECENT: usize = 50;

/// The live events: a broadcast to every connected reader, and the most recent few.
#[derive(Debug, Clone)]
pub struct Live {
    tx: broadcast::Sender<LiveEvent>,
    recent: Arc<Mutex<VecDeque<LiveEvent>>>,
    /// A slot per reader that may be connected at once.
    readers: Arc<Semaphore>,
}

impl Live {
    fn publish(&self, event: LiveEvent) {
        // Under the lock: a reader subscribing at the same time sees an event either among
        // the recent ones or on its receiver, never both, never neither.
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= RECENT {
            recent.pop_front();
        }
        recent.push_back(event.clone());
        let _ = self.tx.send(event);
    }

    fn subscribe(&self) -> (Vec<LiveEvent>, broadcast::Receiver<LiveEvent>) {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        (recent.iter().cloned().collect(), self.tx.subscribe())
    }
}
/// Notifications kept per observation for polling; the oldest go first.
const FEED_LIMIT: usize = 256;

/// The live events, fed from `server`'s registry and session events, for at most
/// `readers` readers at once.
pub fn live(server: &Lwm2mServer, readers: usize) -> Live {
    let live = Live {
        tx: broadcast::channel(LIVE_BACKLOG).0,
        recent: Arc::default(),
        readers: Arc::new(Semaphore::new(readers)),
    };
    forward(server.events(), live.clone(), registry_event);
    forward(server.session_events(), live.clone(), session_event);
    live
}

/// Publishes every event of `events`, turned into a live event by `convert`.
fn forward<T: Clone + Send + 'static>(mut events: broadcast::Receiver<T>, live: Live, convert: fn(&T) -> LiveEvent) {
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => live.publish(convert(&event)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

fn registration(r: &Registration) -> Value {
    json!({
        "endpoint": r.endpoint,
        "identity": r.identity.to_string(),
        "address": r.peer.to_string(),
        "registration_id": r.id,
        "lifetime_s": r.lifetime.as_secs(),
        "binding": r.binding.as_str(),
        "objects": r.links.as_str(),
    })
}

fn registry_event(event: &RegistryEvent) -> LiveEvent {
    match event {
        RegistryEvent::Registered { registration: r, replaced } => {
            let mut data = registration(r);
            data["replaced"] = json!(replaced.is_some());
            LiveEvent { name: "registered", data }
        }
        RegistryEvent::Updated { registration: r, .. } => {
            let mut data = registration(r);
            data["moved_from"] = json!(event.moved_from().map(|a| a.to_string()));
            LiveEvent { name: "updated", data }
        }
        RegistryEvent::Deregistered { registration: r } => LiveEvent { name: "deregistered", data: registration(r) },
        RegistryEvent::Expired { registration: r } => LiveEvent { name: "expired", data: registration(r) },
        RegistryEvent::Refused { endpoint, identity, peer, code, reason } => LiveEvent {
            name: "registration_refused",
            data: json!({
                "endpoint": endpoint,
                "identity": identity,
                "address": peer.to_string(),
                "coap_code": tether_coap::coap_lite::MessageClass::Response(*code).to_string(),
                "reason": reason,
            }),
        },
        _ => LiveEvent { name: "registry", data: json!({}) },
    }
}

fn session_event(event: &SessionEvent) -> LiveEvent {
    match event {
        SessionEvent::Opened { peer, identity, resumed, replaced, .. } => LiveEvent {
            name: if *replaced { "session_replaced" } else { "session_opened" },
            data: json!({ "address": peer.to_string(), "identity": identity, "resumed": resumed }),
        },
        SessionEvent::Moved { from, to, .. } => {
            LiveEvent { name: "session_moved", data: json!({ "from": from.to_string(), "address": to.to_string() }) }
        }
        SessionEvent::Adopted { peer, from, .. } => {
            LiveEvent { name: "session_adopted", data: json!({ "address": peer.to_string(), "from_node": from.0 }) }
        }
        SessionEvent::Closed { peer, reason, .. } => {
            LiveEvent { name: "session_closed", data: json!({ "address": peer.to_string(), "reason": reason }) }
        }
    }
}

/// `GET /api/events`: the most recent events, then the live ones as they happen, as
/// Server-Sent Events (`event:` the name, `data:` JSON). A reader too slow for the backlog
/// gets a `lagged` event with the number it missed. Readers are bounded (`event_readers` in
/// `[limits]`): one more is answered 503.
pub async fn stream(State(api): State<Api>) -> Response {
    let Ok(reader) = Arc::clone(&api.live.readers).try_acquire_owned() else {
        let message = "the server has as many event readers as it takes (event_readers in tether.toml [limits])";
        return super::error(StatusCode::SERVICE_UNAVAILABLE, None, message.into());
    };
    Sse::new(events(&api.live, reader)).keep_alive(KeepAlive::default()).into_response()
}

/// The recent events, then the live ones; holds `reader` (a reader's slot) while it lasts.
fn events(live: &Live, reader: OwnedSemaphorePermit) -> impl Stream<Item = Result<Event, Infallible>> {
    let (recent, events) = live.subscribe();
    let replay = futures::stream::iter(recent.iter().map(sse).map(Ok).collect::<Vec<_>>());
    let live = futures::stream::unfold((events, reader), |(mut events, reader)| async move {
        let event = match events.recv().await {
            Ok(live) => sse(&live),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                Event::default().event("lagged").data(missed.to_string())
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), (events, reader)))
    });
    futures::StreamExt::chain(replay, live)
}

fn sse(live: &LiveEvent) -> Event {
    Event::default().event(live.name).json_data(&live.data).unwrap_or_default()
}

/// The notifications of one observation kept for polling.
#[derive(Debug, Default)]
pub struct Feed {
    queue: VecDeque<Value>,
    active: bool,
}

/// Observations started through the API, by id.
pub type Feeds = Arc<Mutex<HashMap<u64, Feed>>>;

/// Follows observation `id` of `endpoint` (on `watched`: a path, or a composite): each
/// notification, decoded by `decode`, goes to the live events and to the observation's feed.
pub fn follow(
    api: &Api,
    id: u64,
    endpoint: &str,
    watched: &str,
    mut notifications: mpsc::Receiver<DeviceResponse>,
    decode: fn(&DeviceResponse, &str, &Models) -> Value,
) {
    api.feeds.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Feed { queue: VecDeque::new(), active: true });
    let (feeds, live, models) = (Arc::clone(&api.feeds), api.live.clone(), Arc::clone(&api.models));
    let (endpoint, watched) = (endpoint.to_string(), watched.to_string());
    tokio::spawn(async move {
        while let Some(notification) = notifications.recv().await {
            let mut data = decode(&notification, &watched, &models);
            data["observation"] = json!(id);
            data["endpoint"] = json!(endpoint);
            data["watched"] = json!(watched);
            {
                let mut feeds = feeds.lock().unwrap_or_else(|e| e.into_inner());
                // Cancelled through the API: dropping the receiver ends the observation.
                let Some(feed) = feeds.get_mut(&id) else { return };
                if feed.queue.len() >= FEED_LIMIT {
                    feed.queue.pop_front();
                }
                feed.queue.push_back(data.clone());
            }
            live.publish(LiveEvent { name: "notification", data });
        }
        let mut feeds = feeds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(feed) = feeds.get_mut(&id) {
            feed.active = false;
            if feed.queue.is_empty() {
                feeds.remove(&id);
            }
        }
        drop(feeds);
        live.publish(LiveEvent { name: "observation_ended", data: json!({ "observation": id }) });
    });
}

/// The notifications of observation `id` since the last call and whether it is still
/// active; `None` if there is no such observation.
pub fn drain(feeds: &Feeds, id: u64) -> Option<(Vec<Value>, bool)> {
    let mut feeds = feeds.lock().unwrap_or_else(|e| e.into_inner());
    let feed = feeds.get_mut(&id)?;
    let values: Vec<Value> = feed.queue.drain(..).collect();
    let active = feed.active;
    if !active {
        feeds.remove(&id);
    }
    Some((values, active))
}
