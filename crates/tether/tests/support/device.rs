//! A scripted LwM2M device for tests: registers, then answers reads.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::time::Duration;

use tether::lwm2m::build;
use tether::DtlsClient;
use tether_coap::coap_lite::{CoapOption, MessageClass, RequestType, ResponseType};
use tether_coap::message::{CoapConfig, CoapEvent, MessageLayer};
use tether_coap::registration::response;
use tokio::sync::mpsc;

/// A scripted device: registers as `endpoint`, then answers every GET with `value`.
/// Reports the registration response code and location on `registered`.
pub async fn device(
    client: DtlsClient,
    endpoint: &'static str,
    value: &'static str,
    registered: mpsc::Sender<(ResponseType, Vec<String>)>,
) {
    let mut layer = MessageLayer::new(CoapConfig::default(), 99);
    // Observations: the observing request and the last Observe sequence number.
    let mut observed: Vec<(tether_coap::message::IncomingRequest, u32)> = Vec::new();
    let mut register =
        build(RequestType::Post, "/rd", Some(40), br#"</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>"#.to_vec());
    register.add_option(CoapOption::UriQuery, format!("ep={endpoint}").into_bytes());
    register.add_option(CoapOption::UriQuery, b"lt=300".to_vec());
    register.add_option(CoapOption::UriQuery, b"lwm2m=1.1".to_vec());
    layer.request(std::time::Instant::now(), register, true, false).unwrap();
    loop {
        while let Some(event) = layer.poll_event() {
            match event {
                CoapEvent::Response { response, .. } => {
                    let MessageClass::Response(code) = response.header.code else {
                        continue;
                    };
                    let location = response
                        .get_option(CoapOption::LocationPath)
                        .map(|l| l.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
                        .unwrap_or_default();
                    let _ = registered.send((code, location)).await;
                }
                CoapEvent::Request { id, request } => {
                    let mut answer = response(ResponseType::Content);
                    if request.header.code == MessageClass::Request(RequestType::Get) {
                        answer.add_option(CoapOption::ContentFormat, vec![]);
                        answer.payload = value.as_bytes().to_vec();
                        // Values over 64 bytes go in Block2 blocks of 64 (szx 2).
                        if answer.payload.len() > 64 {
                            let asked = request
                                .get_first_option(CoapOption::Block2)
                                .map_or(0, |v| v.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) >> 4)
                                as usize;
                            let start = (asked * 64).min(answer.payload.len());
                            let end = (start + 64).min(answer.payload.len());
                            let more = end < answer.payload.len();
                            let block = ((asked as u32) << 4) | (u32::from(more) << 3) | 2;
                            let bytes = block.to_be_bytes();
                            let first = bytes.iter().position(|b| *b != 0).unwrap_or(3);
                            answer.add_option(CoapOption::Block2, bytes[first..].to_vec());
                            answer.payload = answer.payload[start..end].to_vec();
                        }
                        if request.get_observe_value().is_some_and(|o| o.is_ok_and(|v| v == 0)) {
                            answer.set_observe_value(1);
                            observed.push((id.clone(), 1));
                        }
                    }
                    layer.respond(std::time::Instant::now(), &id, answer).unwrap();
                }
                CoapEvent::ObservationCancelled { token } => observed.retain(|(id, _)| id.token() != token),
                _ => {}
            }
        }
        // Answers go out before waiting for more input.
        while let Some(d) = layer.poll_transmit() {
            if client.send(&d).await.is_err() {
                return;
            }
        }
        tokio::select! {
            data = client.recv() => match data {
                Some(d) => layer.handle_datagram(std::time::Instant::now(), &d),
                None => return,
            },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                let now = std::time::Instant::now();
                layer.handle_timeout(now);
                // Observed values change: notify every tick.
                for (id, seq) in &mut observed {
                    *seq += 1;
                    let mut notification = response(ResponseType::Content);
                    notification.set_observe_value(*seq);
                    notification.payload = format!("{value}#{seq}").into_bytes();
                    layer.notify(now, id, notification, false).unwrap();
                }
            }
        }
    }
}
