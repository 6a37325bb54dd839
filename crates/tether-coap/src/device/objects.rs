//! A device's objects: Security (0), Server (1), Device (3), Firmware Update (5, see
//! [`super::firmware`]) and Temperature (3303), with
//! values that behave like a real device's (a clock that advances, a battery that drains,
//! free memory that moves, an error code when the battery runs low, a temperature that
//! follows a 10-minute cycle with its min and max), and the Read / Write / Execute /
//! Discover / Write-Attributes semantics of OMA LwM2M 1.1 §6.3 over them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};

use super::firmware::{self, Firmware};
use crate::content::{self, format, Entry, Path, ResourceType, Value};
use crate::link_format::Link;
use crate::packet::{decode_uint, encode_uint};
use crate::registration::{response, uri_path, Lifetime};

/// Identification of a device (the Device object's fixed resources).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// /3/0/0 Manufacturer.
    pub manufacturer: String,
    /// /3/0/1 Model Number.
    pub model: String,
    /// /3/0/2 Serial Number.
    pub serial: String,
    /// /3/0/3 Firmware Version.
    pub firmware_version: String,
    /// /3/0/17 Device Type.
    pub device_type: String,
    /// /3/0/18 Hardware Version.
    pub hardware_version: String,
    /// /3/0/19 Software Version.
    pub software_version: String,
}

impl DeviceInfo {
    /// A simulated tether device whose serial number is derived from its endpoint name.
    pub fn simulated(endpoint: &str) -> Self {
        // FNV-1a: a stable serial per name, not a secret.
        let hash =
            endpoint.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        Self {
            manufacturer: "tether".into(),
            model: "tether-sim-1".into(),
            serial: format!("TS-{:012X}", hash & 0xFFFF_FFFF_FFFF),
            firmware_version: concat!("tether-fw ", env!("CARGO_PKG_VERSION")).into(),
            device_type: "sensor".into(),
            hardware_version: "rev-b".into(),
            software_version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// The Server object's registration retry timers (/1/x/17–20, LwM2M 1.1 §6.2.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryTimers {
    /// /1/x/17 Communication Retry Count: attempts in one sequence. Default 5.
    pub retry_count: u32,
    /// /1/x/18 Communication Retry Timer: the delay after attempt n is this · 2^(n−1).
    /// Default 60 s.
    pub retry_timer: Duration,
    /// /1/x/19 Communication Sequence Delay Timer: the pause between sequences. Default 24 h.
    pub sequence_delay: Duration,
    /// /1/x/20 Communication Sequence Retry Count: sequences before giving up. Default 1.
    pub sequence_retry_count: u32,
}

impl Default for RetryTimers {
    fn default() -> Self {
        Self {
            retry_count: 5,
            retry_timer: Duration::from_secs(60),
            sequence_delay: Duration::from_secs(86_400),
            sequence_retry_count: 1,
        }
    }
}

/// How the device authenticates to the server (the Security object's mode, /0/0/2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SecurityMode {
    /// Pre-shared key (mode 0).
    #[default]
    PreSharedKey,
    /// X.509 certificate (mode 2).
    Certificate,
}

impl SecurityMode {
    /// The resource value.
    pub fn value(self) -> i64 {
        match self {
            Self::PreSharedKey => 0,
            Self::Certificate => 2,
        }
    }
}

/// Notification attributes set with Write-Attributes (LwM2M 1.1 §5.1.2).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Attributes {
    /// Minimum period between notifications.
    pub pmin: Option<Duration>,
    /// Maximum period without a notification.
    pub pmax: Option<Duration>,
    /// Notify when the value rises above.
    pub gt: Option<f64>,
    /// Notify when the value falls below.
    pub lt: Option<f64>,
    /// Notify when the value moved by at least.
    pub st: Option<f64>,
}

/// What answering a request asks of the device beyond the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Execute /3/0/4 (or factory reset /3/0/5): reboot once the response is out.
    Reboot,
    /// Execute /1/x/8, or the lifetime or binding was written: send an Update now.
    UpdateRegistration,
}

/// The device's object instances. Values that change with time are computed from `now`.
#[derive(Debug, Clone)]
pub struct Objects {
    info: DeviceInfo,
    server_uri: String,
    /// Security mode (/0/0/2): 0 PSK, 2 certificate.
    security_mode: i64,
    short_server_id: i64,
    /// /1/0/1 in seconds.
    pub lifetime: Duration,
    default_pmin: i64,
    default_pmax: i64,
    notification_storing: bool,
    binding: String,
    /// /1/0/17–20.
    pub retry: RetryTimers,
    /// Monotonic instant at which the device (re)booted, and the Unix time then.
    booted: Instant,
    unix_at_boot: i64,
    /// Seconds added to the clock by writes of /3/0/13.
    clock_adjustment: i64,
    utc_offset: String,
    timezone: String,
    errors_reset_at: Option<Instant>,
    /// Temperature (3303/0): min and max are measured since this instant.
    temperature_reset_at: Instant,
    /// /3303/0/5750.
    application_type: String,
    /// Firmware Update (5/0).
    firmware: Firmware,
    attributes: BTreeMap<Path, Attributes>,
}

/// Battery percentage lost per hour of uptime.
const BATTERY_DRAIN_PER_HOUR: u64 = 10;
/// Total memory in KiB (/3/0/21).
const MEMORY_TOTAL_KIB: i64 = 1024;

impl Objects {
    /// Objects of a device that booted at `now` (Unix time `unix_now`).
    pub fn new(
        info: DeviceInfo,
        server_uri: String,
        security: SecurityMode,
        lifetime: Duration,
        retry: RetryTimers,
        now: Instant,
        unix_now: i64,
    ) -> Self {
        Self {
            info,
            server_uri,
            security_mode: security.value(),
            short_server_id: 1,
            lifetime,
            default_pmin: 0,
            default_pmax: 0,
            notification_storing: true,
            binding: "U".into(),
            retry,
            booted: now,
            unix_at_boot: unix_now,
            clock_adjustment: 0,
            utc_offset: "+00:00".into(),
            timezone: "Etc/UTC".into(),
            errors_reset_at: None,
            temperature_reset_at: now,
            application_type: "ambient".into(),
            firmware: Firmware::default(),
            attributes: BTreeMap::new(),
        }
    }

    /// The device rebooted at `now`: volatile state (uptime, attributes) starts again, and
    /// a firmware update in progress is installed.
    pub fn reboot(&mut self, now: Instant) {
        self.firmware.boot();
        let elapsed = now.saturating_duration_since(self.booted).as_secs() as i64;
        self.unix_at_boot += elapsed;
        self.booted = now;
        self.errors_reset_at = None;
        self.temperature_reset_at = now;
        self.attributes.clear();
    }

    /// The object instances registered (`</1/0>,</3/0>,</5/0>,</3303/0>`): the Security object is
    /// never listed (LwM2M 1.1 §6.2.1).
    pub fn registration_links(&self, content_format: u16) -> String {
        format!(
            "</>;rt=\"oma.lwm2m\";ct={content_format},</1>;ver=1.1,</1/0>,</3>;ver=1.1,</3/0>,</5/0>,</3303>;ver=1.1,</3303/0>"
        )
    }

    /// The temperature (/3303/0/5700) at `now`, in °C: 21 ± 3 over a 10-minute cycle, to
    /// a tenth of a degree.
    pub fn temperature(&self, now: Instant) -> f64 {
        let uptime = now.saturating_duration_since(self.booted).as_secs_f64();
        (210.0 + 30.0 * (uptime * std::f64::consts::TAU / 600.0).sin()).round() / 10.0
    }

    /// The lowest and highest temperature since the last reset (/3303/0/5601, 5602),
    /// sampled every 10 s.
    fn temperature_extremes(&self, now: Instant) -> (f64, f64) {
        let since = now.saturating_duration_since(self.temperature_reset_at).min(Duration::from_secs(600));
        let samples = (since.as_secs() / 10) as u32;
        (0..=samples)
            .map(|i| self.temperature(now - Duration::from_secs(10) * i))
            .fold((f64::MAX, f64::MIN), |(lo, hi), t| (lo.min(t), hi.max(t)))
    }

    /// The server URI the Security object holds (/0/0/0); visible to the device only.
    pub fn server_uri(&self) -> &str {
        &self.server_uri
    }

    /// The security mode (/0/0/2): 0 PSK, 2 certificate; visible to the device only.
    pub fn security_mode(&self) -> i64 {
        self.security_mode
    }

    /// The binding (/1/0/7).
    pub fn binding(&self) -> &str {
        &self.binding
    }

    /// Blocks of a firmware package are arriving (State 1, Downloading) or stopped.
    pub fn set_firmware_downloading(&mut self, downloading: bool) {
        self.firmware.set_downloading(downloading);
    }

    /// Attributes set on `path`, if any.
    pub fn attributes(&self, path: &Path) -> Attributes {
        self.attributes.get(path).copied().unwrap_or_default()
    }

    /// The device's clock (Unix time) at `now`, moved by `adjustment` seconds: saturating, so
    /// no clock a server writes overflows it.
    fn clock(&self, now: Instant, adjustment: i64) -> i64 {
        let uptime = i64::try_from(now.saturating_duration_since(self.booted).as_secs()).unwrap_or(i64::MAX);
        self.unix_at_boot.saturating_add(uptime).saturating_add(adjustment)
    }

    /// Battery level in percent at `now`.
    pub fn battery_level(&self, now: Instant) -> i64 {
        let hours_x100 = now.saturating_duration_since(self.booted).as_secs() * BATTERY_DRAIN_PER_HOUR * 100 / 3600;
        (100 - (hours_x100 / 100) as i64).max(3)
    }

    /// Every value of the readable resources under `path`, or the response code why not.
    pub fn read(&self, now: Instant, path: &Path) -> Result<Vec<Entry>, ResponseType> {
        if path.object == 0 {
            // Only a Bootstrap-Server may touch the Security object (LwM2M 1.1 §E.1): its
            // key material never leaves the device.
            return Err(ResponseType::Unauthorized);
        }
        if !matches!(path.object, 1 | 3 | 5 | 3303) {
            return Err(ResponseType::NotFound);
        }
        if path.instance.is_some_and(|i| i != 0) {
            return Err(ResponseType::NotFound);
        }
        let mut entries = Vec::new();
        for &resource in resources(path.object) {
            if path.resource.is_some_and(|r| r != resource) {
                continue;
            }
            match self.value(now, path.object, resource) {
                Some(Resource::Single(value)) => {
                    if path.resource_instance.is_some() {
                        return Err(ResponseType::NotFound);
                    }
                    entries.push(Entry { path: at(path.object, resource, None), value });
                }
                Some(Resource::Multiple(values)) => {
                    for (instance, value) in values {
                        if path.resource_instance.is_some_and(|ri| ri != instance) {
                            continue;
                        }
                        entries.push(Entry { path: at(path.object, resource, Some(instance)), value });
                    }
                }
                None if path.resource.is_some() => return Err(ResponseType::MethodNotAllowed),
                None => {}
            }
        }
        if entries.is_empty() {
            return Err(ResponseType::NotFound);
        }
        Ok(entries)
    }

    fn value(&self, now: Instant, object: u16, resource: u16) -> Option<Resource> {
        use Resource::{Multiple, Single};
        let uptime = now.saturating_duration_since(self.booted).as_secs() as i64;
        let battery = self.battery_level(now);
        let value = match (object, resource) {
            (1, 0) => Single(Value::Integer(self.short_server_id)),
            (1, 1) => Single(Value::Integer(self.lifetime.as_secs() as i64)),
            (1, 2) => Single(Value::Integer(self.default_pmin)),
            (1, 3) => Single(Value::Integer(self.default_pmax)),
            (1, 6) => Single(Value::Boolean(self.notification_storing)),
            (1, 7) => Single(Value::String(self.binding.clone())),
            (1, 17) => Single(Value::Unsigned(u64::from(self.retry.retry_count))),
            (1, 18) => Single(Value::Unsigned(self.retry.retry_timer.as_secs())),
            (1, 19) => Single(Value::Unsigned(self.retry.sequence_delay.as_secs())),
            (1, 20) => Single(Value::Unsigned(u64::from(self.retry.sequence_retry_count))),
            (3, 0) => Single(Value::String(self.info.manufacturer.clone())),
            (3, 1) => Single(Value::String(self.info.model.clone())),
            (3, 2) => Single(Value::String(self.info.serial.clone())),
            (3, 3) => {
                Single(Value::String(self.firmware.installed().unwrap_or(&self.info.firmware_version).to_string()))
            }
            // Power sources: 1 internal battery, 5 USB.
            (3, 6) => Multiple(vec![(0, Value::Integer(1)), (1, Value::Integer(5))]),
            // Voltage (mV) and current (mA) per power source.
            (3, 7) => Multiple(vec![(0, Value::Integer(3300 + battery * 9)), (1, Value::Integer(5000))]),
            (3, 8) => Multiple(vec![(0, Value::Integer(40 + uptime % 7)), (1, Value::Integer(0))]),
            (3, 9) => Single(Value::Integer(battery)),
            // Free memory moves as the firmware allocates and frees.
            (3, 10) => Single(Value::Integer(MEMORY_TOTAL_KIB / 2 + (uptime * 37 % 101) - 50)),
            (3, 11) => Multiple(vec![(0, Value::Integer(self.error_code(now)))]),
            (3, 13) => Single(Value::Time(self.clock(now, self.clock_adjustment))),
            (3, 14) => Single(Value::String(self.utc_offset.clone())),
            (3, 15) => Single(Value::String(self.timezone.clone())),
            (3, 16) => Single(Value::String("U".into())),
            (3, 17) => Single(Value::String(self.info.device_type.clone())),
            (3, 18) => Single(Value::String(self.info.hardware_version.clone())),
            (3, 19) => Single(Value::String(self.info.software_version.clone())),
            // Battery status: 0 normal, 4 low.
            (3, 20) => Single(Value::Integer(if battery < 10 { 4 } else { 0 })),
            (3, 21) => Single(Value::Integer(MEMORY_TOTAL_KIB)),
            (5, 1) => Single(Value::String(self.firmware.uri().to_string())),
            (5, 3) => Single(Value::Integer(self.firmware.state())),
            (5, 5) => Single(Value::Integer(self.firmware.result())),
            (5, 6) => Single(Value::String(self.firmware.package().0.to_string())),
            (5, 7) => Single(Value::String(self.firmware.package().1.to_string())),
            (5, 9) => Single(Value::Integer(firmware::DELIVERY_PUSH_ONLY)),
            (3303, 5601) => Single(Value::Float(self.temperature_extremes(now).0)),
            (3303, 5602) => Single(Value::Float(self.temperature_extremes(now).1)),
            (3303, 5603) => Single(Value::Float(-40.0)),
            (3303, 5604) => Single(Value::Float(85.0)),
            (3303, 5700) => Single(Value::Float(self.temperature(now))),
            (3303, 5701) => Single(Value::String("Cel".into())),
            (3303, 5750) => Single(Value::String(self.application_type.clone())),
            _ => return None,
        };
        Some(value)
    }

    /// Error code /3/0/11: 1 (low battery) below 10 %, unless reset since it appeared.
    fn error_code(&self, now: Instant) -> i64 {
        let low = self.battery_level(now) < 10;
        let reset = self.errors_reset_at.is_some_and(|at| self.battery_level(at) < 10);
        if low && !reset {
            1
        } else {
            0
        }
    }

    /// Writes `entries` (already decoded). `replace` is a PUT (the whole instance or resource).
    pub fn write(&mut self, now: Instant, entries: &[Entry]) -> Result<Option<Effect>, ResponseType> {
        // Check everything before changing anything: a write applies whole or not at all.
        for entry in entries {
            if !writable(&entry.path) {
                return Err(if entry.path.object == 0 {
                    ResponseType::Unauthorized
                } else {
                    ResponseType::MethodNotAllowed
                });
            }
            if !value_fits(&entry.path, &entry.value) {
                return Err(ResponseType::BadRequest);
            }
            if entry.path.object == 5 && !self.firmware.writable() {
                return Err(ResponseType::MethodNotAllowed);
            }
        }
        let mut effect = None;
        for entry in entries {
            match (entry.path.object, entry.path.resource, &entry.value) {
                // Checked against the model's range above: each fits what holds it.
                (1, Some(1), value) => {
                    self.lifetime = Lifetime::clamped(as_u64(value).unwrap_or(1)).duration();
                    effect = Some(Effect::UpdateRegistration);
                }
                (1, Some(2), value) => self.default_pmin = as_u32(value).into(),
                (1, Some(3), value) => self.default_pmax = as_u32(value).into(),
                (1, Some(6), Value::Boolean(b)) => self.notification_storing = *b,
                (1, Some(7), Value::String(binding)) => {
                    self.binding = binding.clone();
                    effect = Some(Effect::UpdateRegistration);
                }
                (3303, Some(5750), Value::String(kind)) => self.application_type = kind.clone(),
                (5, Some(0), Value::Opaque(package)) => self.firmware.write_package(package),
                (5, Some(1), Value::String(uri)) => self.firmware.write_uri(uri),
                (1, Some(17), value) => self.retry.retry_count = as_u32(value).max(1),
                (1, Some(18), value) => self.retry.retry_timer = Duration::from_secs(as_u32(value).into()),
                (1, Some(19), value) => self.retry.sequence_delay = Duration::from_secs(as_u32(value).into()),
                (1, Some(20), value) => self.retry.sequence_retry_count = as_u32(value).max(1),
                (3, Some(13), value) => {
                    let wanted = match value {
                        Value::Time(t) | Value::Integer(t) => *t,
                        _ => 0,
                    };
                    self.clock_adjustment = wanted.saturating_sub(self.clock(now, 0));
                }
                (3, Some(14), Value::String(v)) => self.utc_offset = v.clone(),
                (3, Some(15), Value::String(v)) => self.timezone = v.clone(),
                _ => {}
            }
        }
        Ok(effect)
    }

    /// Executes `path`.
    pub fn execute(&mut self, now: Instant, path: &Path) -> Result<Option<Effect>, ResponseType> {
        match (path.object, path.instance, path.resource, path.resource_instance) {
            (0, ..) => Err(ResponseType::Unauthorized),
            // Reboot and factory reset (a simulated device has nothing else to reset).
            (3, Some(0), Some(4 | 5), None) => Ok(Some(Effect::Reboot)),
            (3, Some(0), Some(12), None) => {
                self.errors_reset_at = Some(now);
                Ok(None)
            }
            (1, Some(0), Some(8), None) => Ok(Some(Effect::UpdateRegistration)),
            (3303, Some(0), Some(5605), None) => {
                self.temperature_reset_at = now;
                Ok(None)
            }
            // Update: the device answers, then reboots into the new firmware.
            (5, Some(0), Some(2), None) => self.firmware.update().map(|()| Some(Effect::Reboot)),
            (5, Some(0), Some(10), None) => self.firmware.cancel().map(|()| None),
            (1 | 3 | 5 | 3303, Some(0), Some(r), None) if resources(path.object).contains(&r) => {
                Err(ResponseType::MethodNotAllowed)
            }
            (1 | 3 | 5 | 3303, Some(0), None, None) | (1 | 3 | 5 | 3303, None, None, None) => {
                Err(ResponseType::MethodNotAllowed)
            }
            _ => Err(ResponseType::NotFound),
        }
    }

    /// Write-Attributes: `pmin`, `pmax`, `gt`, `lt`, `st` from query items (`name=value`,
    /// or `name` alone to remove).
    pub fn write_attributes(&mut self, path: &Path, items: &[String]) -> Result<(), ResponseType> {
        if path.object == 0 {
            return Err(ResponseType::Unauthorized);
        }
        if self.read(self.booted, path).is_err() && path.resource.is_none_or(|r| !resources(path.object).contains(&r)) {
            return Err(ResponseType::NotFound);
        }
        let mut attributes = self.attributes(path);
        for item in items {
            let (name, value) = match item.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (item.as_str(), None),
            };
            match (name, value) {
                ("pmin", value) => attributes.pmin = value.map(period).transpose()?,
                ("pmax", value) => attributes.pmax = value.map(period).transpose()?,
                ("gt", value) => attributes.gt = value.map(threshold).transpose()?,
                ("lt", value) => attributes.lt = value.map(threshold).transpose()?,
                ("st", value) => attributes.st = value.map(step).transpose()?,
                _ => return Err(ResponseType::BadRequest),
            }
        }
        if let (Some(min), Some(max)) = (attributes.pmin, attributes.pmax) {
            if max < min {
                return Err(ResponseType::BadRequest);
            }
        }
        self.attributes.insert(*path, attributes);
        Ok(())
    }

    /// Discover (LwM2M 1.1 §5.4.2): the instances and resources under `path` as link format,
    /// with the attributes attached to each.
    pub fn discover(&self, path: &Path) -> Result<String, ResponseType> {
        if path.object == 0 {
            return Err(ResponseType::Unauthorized);
        }
        if !matches!(path.object, 1 | 3 | 5 | 3303)
            || path.instance.is_some_and(|i| i != 0)
            || path.resource_instance.is_some()
        {
            return Err(ResponseType::NotFound);
        }
        let mut links = Vec::new();
        let object = Path { object: path.object, instance: None, resource: None, resource_instance: None };
        let instance = Path { instance: Some(0), ..object };
        if path.instance.is_none() {
            links.push(self.link(&object, vec![("ver".into(), Some("1.1".into()))]));
        }
        if path.resource.is_none() {
            links.push(self.link(&instance, Vec::new()));
        }
        for &resource in resources(path.object) {
            if path.resource.is_some_and(|r| r != resource) {
                continue;
            }
            let mut extra = Vec::new();
            if let Some(Resource::Multiple(values)) = self.value(self.booted, path.object, resource) {
                extra.push(("dim".into(), Some(values.len().to_string())));
            }
            links.push(self.link(&at(path.object, resource, None), extra));
        }
        if path.resource.is_some() && links.is_empty() {
            return Err(ResponseType::NotFound);
        }
        Ok(links.iter().map(ToString::to_string).collect::<Vec<_>>().join(","))
    }

    fn link(&self, path: &Path, mut attributes: Vec<(String, Option<String>)>) -> Link {
        let set = self.attributes(path);
        let seconds = |d: Duration| Some(format!("{}", d.as_secs_f64()));
        for (name, value) in [
            ("pmin", set.pmin.and_then(seconds)),
            ("pmax", set.pmax.and_then(seconds)),
            ("gt", set.gt.map(|v| v.to_string())),
            ("lt", set.lt.map(|v| v.to_string())),
            ("st", set.st.map(|v| v.to_string())),
        ] {
            if let Some(value) = value {
                attributes.push((name.into(), Some(value)));
            }
        }
        Link { target: path.to_string(), attributes }
    }
}

enum Resource {
    Single(Value),
    Multiple(Vec<(u16, Value)>),
}

/// Longest notification period accepted (`pmin`, `pmax`): 2^32 − 1 s.
const MAX_PERIOD_SECS: f64 = u32::MAX as f64;

/// A `pmin`/`pmax` value: seconds, finite, 0 to [`MAX_PERIOD_SECS`].
fn period(text: &str) -> Result<Duration, ResponseType> {
    let seconds = threshold(text)?;
    if !(0.0..=MAX_PERIOD_SECS).contains(&seconds) {
        return Err(ResponseType::BadRequest);
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| ResponseType::BadRequest)
}

/// A `gt`/`lt` value: any finite number (NaN and infinities are refused).
fn threshold(text: &str) -> Result<f64, ResponseType> {
    text.trim().parse::<f64>().ok().filter(|v| v.is_finite()).ok_or(ResponseType::BadRequest)
}

/// An `st` value: a finite step, not negative.
fn step(text: &str) -> Result<f64, ResponseType> {
    threshold(text).and_then(|v| if v >= 0.0 { Ok(v) } else { Err(ResponseType::BadRequest) })
}

/// Resource IDs of an object, readable or executable.
fn resources(object: u16) -> &'static [u16] {
    match object {
        1 => &[0, 1, 2, 3, 6, 7, 8, 17, 18, 19, 20],
        3 => &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
        5 => &[0, 1, 2, 3, 5, 6, 7, 9, 10],
        3303 => &[5601, 5602, 5603, 5604, 5605, 5700, 5701, 5750],
        _ => &[],
    }
}

fn writable(path: &Path) -> bool {
    match (path.object, path.instance, path.resource) {
        (1, Some(0), Some(r)) => matches!(r, 1 | 2 | 3 | 6 | 7 | 17..=20),
        (3, Some(0), Some(r)) => matches!(r, 13..=15),
        (3303, Some(0), Some(5750)) | (5, Some(0), Some(0 | 1)) => true,
        _ => false,
    }
}

/// Whether `value` is of the type of the resource at `path` and within its range (the
/// built-in models hold what the specification says: Lifetime is positive, timers fit 32
/// bits, Current Time is a Unix time): a device refuses anything else with 4.00 instead of
/// keeping a value it cannot use.
fn value_fits(path: &Path, value: &Value) -> bool {
    let Some(model) = path.resource.and_then(|r| crate::model::resource(path.object, r)) else { return false };
    let number = match (model.kind, value) {
        (ResourceType::String, Value::String(_))
        | (ResourceType::Boolean, Value::Boolean(_))
        | (ResourceType::Opaque, Value::Opaque(_)) => return true,
        (ResourceType::Integer | ResourceType::Unsigned | ResourceType::Time, Value::Unsigned(v)) => *v as f64,
        (ResourceType::Integer | ResourceType::Unsigned | ResourceType::Time, Value::Integer(v) | Value::Time(v)) => {
            *v as f64
        }
        _ => return false,
    };
    model.range.is_none_or(|range| range.contains(number))
}

/// A value checked to be within 0..=u32::MAX ([`value_fits`]); anything else reads as 0.
fn as_u32(value: &Value) -> u32 {
    as_u64(value).and_then(|v| u32::try_from(v).ok()).unwrap_or(0)
}

fn as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Integer(v) | Value::Time(v) => u64::try_from(*v).ok(),
        Value::Unsigned(v) => Some(*v),
        _ => None,
    }
}

fn at(object: u16, resource: u16, resource_instance: Option<u16>) -> Path {
    Path { object, instance: Some(0), resource: Some(resource), resource_instance }
}

/// What an observation watches: one path (Observe), or several (Observe-Composite, LwM2M
/// 1.1 §6.3.8: `FETCH /` with SenML-ETCH paths and Observe 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// `GET` of one path.
    Path(Path),
    /// `FETCH` of several paths, answered in SenML.
    Composite(Vec<Path>),
}

impl Observed {
    /// The current value of what is observed, encoded in `format` (as its first answer was).
    pub fn read(&self, objects: &Objects, now: Instant, format: u16) -> Result<Packet, ResponseType> {
        match self {
            Self::Path(path) => read(objects, now, path, Some(format), format).map(|(packet, _)| packet),
            Self::Composite(paths) => read_paths(objects, now, paths, format),
        }
    }
}

/// A request the device answered, and what else it asks for.
#[derive(Debug)]
pub struct Answer {
    /// The response to send.
    pub response: Packet,
    /// What the device does once the response is out.
    pub effect: Option<Effect>,
    /// The request is an Observe registration on this target in this format.
    pub observe: Option<(Observed, u16)>,
    /// The request cancels an observation (Observe 1).
    pub cancel_observation: bool,
    /// The request was an Execute that ran.
    pub executed: bool,
}

/// Answers one request from the server. `preferred` is the format for multi-value reads
/// when the server does not ask for one.
pub fn answer(objects: &mut Objects, now: Instant, request: &Packet, preferred: u16) -> Answer {
    let plain = |code| Answer {
        response: response(code),
        effect: None,
        observe: None,
        cancel_observation: false,
        executed: false,
    };
    let segments = uri_path(request);
    if segments.is_empty() && request.header.code == MessageClass::Request(RequestType::Fetch) {
        let observe = request.get_observe_value().and_then(Result::ok);
        return match read_composite(objects, now, request, preferred) {
            Ok((packet, paths, chosen)) => Answer {
                response: packet,
                observe: (observe == Some(0)).then_some((Observed::Composite(paths), chosen)),
                cancel_observation: observe == Some(1),
                ..plain(ResponseType::Content)
            },
            Err(code) => plain(code),
        };
    }
    if segments.is_empty() && request.header.code == MessageClass::Request(RequestType::IPatch) {
        return match write_composite(objects, now, request) {
            Ok(effect) => Answer { effect, ..plain(ResponseType::Changed) },
            Err(code) => plain(code),
        };
    }
    let Ok(path) = Path::parse(&segments.join("/")) else {
        return plain(if segments.is_empty() { ResponseType::MethodNotAllowed } else { ResponseType::NotFound });
    };
    let accept = request.get_first_option(CoapOption::Accept).and_then(|v| decode_uint(v));
    let content_format = request.get_first_option(CoapOption::ContentFormat).and_then(|v| decode_uint(v));
    let MessageClass::Request(method) = request.header.code else { return plain(ResponseType::BadRequest) };
    match method {
        RequestType::Get if accept == Some(format::LINK) => match objects.discover(&path) {
            Ok(links) => {
                let mut packet = response(ResponseType::Content);
                packet.add_option(CoapOption::ContentFormat, encode_uint(u32::from(format::LINK)));
                packet.payload = links.into_bytes();
                Answer { response: packet, effect: None, observe: None, cancel_observation: false, executed: false }
            }
            Err(code) => plain(code),
        },
        RequestType::Get => {
            let observe = request.get_observe_value().and_then(Result::ok);
            match read(objects, now, &path, accept, preferred) {
                Ok((packet, chosen)) => Answer {
                    response: packet,
                    effect: None,
                    observe: (observe == Some(0)).then_some((Observed::Path(path), chosen)),
                    cancel_observation: observe == Some(1),
                    executed: false,
                },
                Err(code) => plain(code),
            }
        }
        RequestType::Put if request.payload.is_empty() && content_format.is_none() => {
            let items: Vec<String> = request
                .get_option(CoapOption::UriQuery)
                .map(|q| q.iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect())
                .unwrap_or_default();
            match objects.write_attributes(&path, &items) {
                Ok(()) => plain(ResponseType::Changed),
                Err(code) => plain(code),
            }
        }
        RequestType::Put | RequestType::Post if path.resource.is_none() || content_format.is_some() => {
            if path.instance.is_none() {
                // Create: the device's objects are single-instance.
                return plain(if path.object == 0 {
                    ResponseType::Unauthorized
                } else {
                    ResponseType::MethodNotAllowed
                });
            }
            let cf = content_format.unwrap_or(format::TEXT);
            let entries = match content::decode(cf, &path, &request.payload) {
                Ok(entries) => entries,
                Err(content::ContentError::Unsupported(_)) => return plain(ResponseType::UnsupportedContentFormat),
                Err(_) => return plain(ResponseType::BadRequest),
            };
            if entries.iter().any(|e| !within(&path, &e.path)) {
                return plain(ResponseType::BadRequest);
            }
            match objects.write(now, &entries) {
                Ok(effect) => Answer { effect, ..plain(ResponseType::Changed) },
                Err(code) => plain(code),
            }
        }
        RequestType::Post => match objects.execute(now, &path) {
            Ok(effect) => Answer { effect, executed: true, ..plain(ResponseType::Changed) },
            Err(code) => plain(code),
        },
        RequestType::Delete => {
            plain(if path.object == 0 { ResponseType::Unauthorized } else { ResponseType::MethodNotAllowed })
        }
        _ => plain(ResponseType::MethodNotAllowed),
    }
}

/// Read-Composite (LwM2M 1.1, `FETCH /` with SenML-ETCH paths): the values of every path
/// the device has, in SenML JSON or CBOR (`Accept`, else `preferred` when it is SenML, else
/// CBOR). A path the device lacks is left out; 4.04 if it has none of them. Returns the
/// response, the paths asked for and the format chosen.
fn read_composite(
    objects: &Objects,
    now: Instant,
    request: &Packet,
    preferred: u16,
) -> Result<(Packet, Vec<Path>, u16), ResponseType> {
    let option = |option| request.get_first_option(option).and_then(|v| decode_uint(v));
    let paths =
        content::decode_paths(option(CoapOption::ContentFormat).unwrap_or(format::SENML_ETCH_JSON), &request.payload)
            .map_err(|e| match e {
            content::ContentError::Unsupported(_) => ResponseType::UnsupportedContentFormat,
            _ => ResponseType::BadRequest,
        })?;
    let fallback =
        if matches!(preferred, format::SENML_JSON | format::SENML_CBOR) { preferred } else { format::SENML_CBOR };
    let chosen = option(CoapOption::Accept).unwrap_or(fallback);
    let packet = read_paths(objects, now, &paths, chosen)?;
    Ok((packet, paths, chosen))
}

/// The values under each of `paths` in one SenML payload of `chosen` (JSON or CBOR).
fn read_paths(objects: &Objects, now: Instant, paths: &[Path], chosen: u16) -> Result<Packet, ResponseType> {
    if !matches!(chosen, format::SENML_JSON | format::SENML_CBOR) {
        return Err(ResponseType::NotAcceptable);
    }
    let mut entries = Vec::new();
    for path in paths {
        match objects.read(now, path) {
            Ok(found) => entries.extend(found),
            Err(ResponseType::Unauthorized) => return Err(ResponseType::Unauthorized),
            Err(_) => {}
        }
    }
    let Some(first) = entries.first() else { return Err(ResponseType::NotFound) };
    let base = Path { instance: None, resource: None, resource_instance: None, ..first.path };
    let payload = content::encode(chosen, &base, &entries).map_err(|_| ResponseType::InternalServerError)?;
    let mut packet = response(ResponseType::Content);
    packet.add_option(CoapOption::ContentFormat, encode_uint(u32::from(chosen)));
    packet.payload = payload;
    Ok(packet)
}

/// Write-Composite (LwM2M 1.1 §6.3.7, `iPATCH /` with SenML JSON or CBOR): every value is
/// checked before any is written, so the write applies whole or not at all.
fn write_composite(objects: &mut Objects, now: Instant, request: &Packet) -> Result<Option<Effect>, ResponseType> {
    let content_format = request.get_first_option(CoapOption::ContentFormat).and_then(|v| decode_uint(v));
    let Some(cf @ (format::SENML_JSON | format::SENML_CBOR)) = content_format else {
        return Err(ResponseType::UnsupportedContentFormat);
    };
    let root = Path { object: 0, instance: None, resource: None, resource_instance: None };
    let entries = content::decode(cf, &root, &request.payload).map_err(|_| ResponseType::BadRequest)?;
    if entries.is_empty() || entries.len() > content::MAX_COMPOSITE_PATHS {
        return Err(ResponseType::BadRequest);
    }
    objects.write(now, &entries)
}

/// Reads `path` and encodes it: in `accept` if given, else text for one plain value and
/// `preferred` for several. Returns the response and the format chosen.
pub fn read(
    objects: &Objects,
    now: Instant,
    path: &Path,
    accept: Option<u16>,
    preferred: u16,
) -> Result<(Packet, u16), ResponseType> {
    let entries = objects.read(now, path)?;
    let single = entries.len() == 1 && entries[0].path.resource_instance.is_none() && path.resource.is_some();
    let chosen = accept.unwrap_or(if single { format::TEXT } else { preferred });
    let acceptable = match chosen {
        format::TEXT => single,
        format::OPAQUE => single && matches!(entries[0].value, Value::Opaque(_)),
        format::TLV | format::SENML_JSON | format::SENML_CBOR => true,
        _ => false,
    };
    if !acceptable {
        return Err(ResponseType::NotAcceptable);
    }
    let payload = content::encode(chosen, path, &entries).map_err(|_| ResponseType::InternalServerError)?;
    let mut packet = response(ResponseType::Content);
    packet.add_option(CoapOption::ContentFormat, encode_uint(u32::from(chosen)));
    packet.payload = payload;
    Ok((packet, chosen))
}

/// Whether `inner` lies at or under `outer`.
fn within(outer: &Path, inner: &Path) -> bool {
    inner.object == outer.object
        && outer.instance.is_none_or(|i| inner.instance == Some(i))
        && outer.resource.is_none_or(|r| inner.resource == Some(r))
        && outer.resource_instance.is_none_or(|ri| inner.resource_instance == Some(ri))
}
