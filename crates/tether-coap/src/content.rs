//! LwM2M content formats (OMA-TS-LightweightM2M_Core §7.4): text/plain (0), opaque (42),
//! TLV (11542), SenML JSON (110) and SenML CBOR (112), decoded to and encoded from typed
//! values.
//!
//! TLV and text carry no types on the wire; they are typed with the resource model of the
//! core objects (Security 0, Server 1, Device 3). Resources outside it decode as opaque
//! bytes (TLV) or strings (text). Decoders read what devices sent: malformed input is an
//! error, never a panic.

use std::fmt;

/// Content-Format numbers.
pub mod format {
    /// text/plain.
    pub const TEXT: u16 = 0;
    /// application/link-format.
    pub const LINK: u16 = 40;
    /// application/octet-stream.
    pub const OPAQUE: u16 = 42;
    /// application/senml+json.
    pub const SENML_JSON: u16 = 110;
    /// application/senml+cbor.
    pub const SENML_CBOR: u16 = 112;
    /// application/vnd.oma.lwm2m+tlv.
    pub const TLV: u16 = 11542;
    /// application/senml-etch+json: the paths of a Read-Composite (LwM2M 1.1, RFC 8790).
    pub const SENML_ETCH_JSON: u16 = 320;
    /// application/senml-etch+cbor.
    pub const SENML_ETCH_CBOR: u16 = 322;
}

/// The paths of a Read-Composite or Observe-Composite request (`[{"n": "/3/0/0"}, …]`,
/// SenML-ETCH JSON or CBOR).
pub fn encode_paths(format: u16, paths: &[Path]) -> Result<Vec<u8>, ContentError> {
    match format {
        format::SENML_ETCH_JSON => {
            let records: Vec<serde_json::Value> =
                paths.iter().map(|p| serde_json::json!({ "n": p.to_string() })).collect();
            Ok(serde_json::to_vec(&records).unwrap_or_default())
        }
        format::SENML_ETCH_CBOR => {
            use ciborium::Value as C;
            let records: Vec<C> =
                paths.iter().map(|p| C::Map(vec![(C::Integer(N.into()), C::Text(p.to_string()))])).collect();
            let mut out = Vec::new();
            ciborium::into_writer(&C::Array(records), &mut out)
                .map_err(|e| malformed("SenML-ETCH CBOR", e.to_string()))?;
            Ok(out)
        }
        other => Err(ContentError::Unsupported(other)),
    }
}

/// Parses the paths of a Read-Composite or Observe-Composite request.
pub fn decode_paths(format: u16, payload: &[u8]) -> Result<Vec<Path>, ContentError> {
    let mut base = String::new();
    let mut paths = Vec::new();
    match format {
        format::SENML_ETCH_JSON => {
            use serde_json::Value as J;
            let json: J = serde_json::from_slice(payload).map_err(|e| malformed("SenML-ETCH JSON", e.to_string()))?;
            let J::Array(items) = json else { return Err(malformed("SenML-ETCH JSON", "not an array")) };
            for item in items {
                if let Some(J::String(bn)) = item.get("bn") {
                    base = bn.clone();
                }
                let name = item.get("n").and_then(J::as_str).unwrap_or("");
                paths.push(Path::parse(&format!("{base}{name}"))?);
            }
        }
        format::SENML_ETCH_CBOR => {
            use ciborium::Value as C;
            let value: C = ciborium::from_reader(payload).map_err(|e| malformed("SenML-ETCH CBOR", e.to_string()))?;
            let C::Array(items) = value else { return Err(malformed("SenML-ETCH CBOR", "not an array")) };
            for item in items {
                let C::Map(fields) = item else { return Err(malformed("SenML-ETCH CBOR", "a record is not a map")) };
                let mut name = String::new();
                for (key, field) in fields {
                    match (key.as_integer().and_then(|i| i64::try_from(i).ok()), field) {
                        (Some(BN), C::Text(t)) => base = t,
                        (Some(N), C::Text(t)) => name = t,
                        _ => {}
                    }
                }
                paths.push(Path::parse(&format!("{base}{name}"))?);
            }
        }
        other => return Err(ContentError::Unsupported(other)),
    }
    if paths.is_empty() || paths.len() > MAX_COMPOSITE_PATHS {
        return Err(malformed("SenML-ETCH", format!("1 to {MAX_COMPOSITE_PATHS} paths")));
    }
    Ok(paths)
}

/// Paths one composite request may name.
pub const MAX_COMPOSITE_PATHS: usize = 64;

/// A typed resource value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Signed integer.
    Integer(i64),
    /// Unsigned integer.
    Unsigned(u64),
    /// Float.
    Float(f64),
    /// Boolean.
    Boolean(bool),
    /// UTF-8 string.
    String(String),
    /// Bytes.
    Opaque(Vec<u8>),
    /// Unix time in seconds.
    Time(i64),
    /// Object link `object:instance`.
    ObjectLink(u16, u16),
}

/// A resource type in the object model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceType {
    /// String.
    String,
    /// Integer.
    Integer,
    /// Unsigned integer.
    Unsigned,
    /// Float.
    Float,
    /// Boolean.
    Boolean,
    /// Opaque.
    Opaque,
    /// Time.
    Time,
    /// Object link.
    ObjectLink,
    /// An executable resource (no value).
    None,
}

/// An LwM2M path: `/object[/instance[/resource[/resource-instance]]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Path {
    /// Object ID.
    pub object: u16,
    /// Object instance.
    pub instance: Option<u16>,
    /// Resource.
    pub resource: Option<u16>,
    /// Resource instance.
    pub resource_instance: Option<u16>,
}

impl Path {
    /// Parses `/3/0/9` (leading and trailing slashes optional).
    pub fn parse(text: &str) -> Result<Self, ContentError> {
        let ids: Vec<u16> = text
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|_| ContentError::BadPath(text.to_string())))
            .collect::<Result<_, _>>()?;
        match ids.as_slice() {
            [o] => Ok(Self { object: *o, instance: None, resource: None, resource_instance: None }),
            [o, i] => Ok(Self { object: *o, instance: Some(*i), resource: None, resource_instance: None }),
            [o, i, r] => Ok(Self { object: *o, instance: Some(*i), resource: Some(*r), resource_instance: None }),
            [o, i, r, ri] => {
                Ok(Self { object: *o, instance: Some(*i), resource: Some(*r), resource_instance: Some(*ri) })
            }
            _ => Err(ContentError::BadPath(text.to_string())),
        }
    }

    fn with(self, kind: TlvKind, id: u16) -> Self {
        match kind {
            TlvKind::ObjectInstance => Self { instance: Some(id), resource: None, resource_instance: None, ..self },
            TlvKind::MultipleResource | TlvKind::Resource => {
                Self { resource: Some(id), resource_instance: None, ..self }
            }
            TlvKind::ResourceInstance => Self { resource_instance: Some(id), ..self },
        }
    }

    /// The type of the resource this path names, from the core model.
    pub fn resource_type(&self) -> Option<ResourceType> {
        resource_type(self.object, self.resource?)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.object)?;
        for id in [self.instance, self.resource, self.resource_instance].into_iter().flatten() {
            write!(f, "/{id}")?;
        }
        Ok(())
    }
}

/// One value at one path.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Where.
    pub path: Path,
    /// What.
    pub value: Value,
}

/// Content that cannot be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContentError {
    /// Not a valid LwM2M path.
    #[error("invalid path {0:?}")]
    BadPath(String),
    /// The content format is not supported.
    #[error("unsupported content format {0}")]
    Unsupported(u16),
    /// The payload is malformed.
    #[error("malformed {format}: {reason}")]
    Malformed {
        /// Format name.
        format: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn malformed(format: &'static str, reason: impl Into<String>) -> ContentError {
    ContentError::Malformed { format, reason: reason.into() }
}

/// The resource types of the modelled objects ([`crate::model`]).
pub fn resource_type(object: u16, resource: u16) -> Option<ResourceType> {
    crate::model::resource(object, resource).map(|r| r.kind)
}

/// The type of `/object/x/resource` by some set of models.
pub type Types<'a> = &'a dyn Fn(u16, u16) -> Option<ResourceType>;

fn type_of(types: Types<'_>, path: &Path) -> Option<ResourceType> {
    types(path.object, path.resource?)
}

/// Decodes a payload of `format` answering a request on `base`, typed by the built-in
/// models.
pub fn decode(format: u16, base: &Path, payload: &[u8]) -> Result<Vec<Entry>, ContentError> {
    decode_with(format, base, payload, &resource_type)
}

/// Decodes a payload of `format` answering a request on `base`, typed by `types` (say
/// [`Models::resource_type`](crate::model::Models::resource_type)); resources it does not
/// know keep the type their format gives them (text as strings, TLV as opaque bytes).
pub fn decode_with(format: u16, base: &Path, payload: &[u8], types: Types<'_>) -> Result<Vec<Entry>, ContentError> {
    match format {
        format::TEXT => {
            let text = std::str::from_utf8(payload).map_err(|_| malformed("text", "not UTF-8"))?;
            let value = match type_of(types, base) {
                Some(t) => parse_text(t, text)?,
                Option::None => Value::String(text.to_string()),
            };
            Ok(vec![Entry { path: *base, value }])
        }
        format::OPAQUE => Ok(vec![Entry { path: *base, value: Value::Opaque(payload.to_vec()) }]),
        format::TLV => {
            let mut entries = Vec::new();
            decode_tlv(payload, *base, &mut entries, 0, types)?;
            Ok(entries)
        }
        format::SENML_JSON => decode_senml_json(payload, types),
        format::SENML_CBOR => decode_senml_cbor(payload, types),
        other => Err(ContentError::Unsupported(other)),
    }
}

/// Encodes `entries` (all under `base`) in `format`.
pub fn encode(format: u16, base: &Path, entries: &[Entry]) -> Result<Vec<u8>, ContentError> {
    match format {
        format::TEXT | format::OPAQUE => {
            let [entry] = entries else { return Err(malformed("text", "exactly one value is needed")) };
            Ok(match (&entry.value, format) {
                (Value::Opaque(bytes), format::OPAQUE) => bytes.clone(),
                (value, format::TEXT) => text(value).into_bytes(),
                _ => return Err(malformed("opaque", "only opaque values")),
            })
        }
        format::TLV => Ok(encode_tlv(base, entries)),
        format::SENML_JSON => Ok(encode_senml_json(base, entries)),
        format::SENML_CBOR => encode_senml_cbor(base, entries),
        other => Err(ContentError::Unsupported(other)),
    }
}

fn parse_text(t: ResourceType, text: &str) -> Result<Value, ContentError> {
    let bad = |_| malformed("text", format!("{text:?} is not a valid {t:?}"));
    Ok(match t {
        ResourceType::String | ResourceType::None => Value::String(text.to_string()),
        ResourceType::Integer => Value::Integer(text.parse().map_err(|e: std::num::ParseIntError| bad(e.to_string()))?),
        ResourceType::Unsigned => {
            Value::Unsigned(text.parse().map_err(|e: std::num::ParseIntError| bad(e.to_string()))?)
        }
        ResourceType::Time => Value::Time(text.parse().map_err(|e: std::num::ParseIntError| bad(e.to_string()))?),
        ResourceType::Float => Value::Float(text.parse().map_err(|e: std::num::ParseFloatError| bad(e.to_string()))?),
        ResourceType::Boolean => match text {
            "1" => Value::Boolean(true),
            "0" => Value::Boolean(false),
            _ => return Err(bad(String::new())),
        },
        ResourceType::Opaque => Value::Opaque(text.as_bytes().to_vec()),
        ResourceType::ObjectLink => {
            let (o, i) = text.split_once(':').ok_or_else(|| bad(String::new()))?;
            Value::ObjectLink(o.parse().map_err(|_| bad(String::new()))?, i.parse().map_err(|_| bad(String::new()))?)
        }
    })
}

/// The text/plain form of a value.
pub fn text(value: &Value) -> String {
    match value {
        Value::Integer(v) | Value::Time(v) => v.to_string(),
        Value::Unsigned(v) => v.to_string(),
        Value::Float(v) => v.to_string(),
        Value::Boolean(v) => if *v { "1" } else { "0" }.to_string(),
        Value::String(v) => v.clone(),
        Value::Opaque(v) => v.iter().map(|b| format!("{b:02x}")).collect(),
        Value::ObjectLink(o, i) => format!("{o}:{i}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlvKind {
    ObjectInstance,
    ResourceInstance,
    MultipleResource,
    Resource,
}

const MAX_TLV_DEPTH: usize = 4;

fn decode_tlv(
    mut bytes: &[u8],
    base: Path,
    out: &mut Vec<Entry>,
    depth: usize,
    types: Types<'_>,
) -> Result<(), ContentError> {
    if depth > MAX_TLV_DEPTH {
        return Err(malformed("TLV", "nested too deeply"));
    }
    while !bytes.is_empty() {
        let header = bytes[0];
        let kind = match header >> 6 {
            0 => TlvKind::ObjectInstance,
            1 => TlvKind::ResourceInstance,
            2 => TlvKind::MultipleResource,
            _ => TlvKind::Resource,
        };
        let id_len = if header & 0x20 != 0 { 2 } else { 1 };
        let length_len = usize::from((header >> 3) & 0b11);
        let id_bytes = bytes.get(1..1 + id_len).ok_or_else(|| malformed("TLV", "truncated identifier"))?;
        let id = id_bytes.iter().fold(0u16, |acc, b| (acc << 8) | u16::from(*b));
        let start = 1 + id_len + length_len;
        let length = if length_len == 0 {
            usize::from(header & 0b111)
        } else {
            let len_bytes = bytes.get(1 + id_len..start).ok_or_else(|| malformed("TLV", "truncated length"))?;
            len_bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
        };
        let value = bytes.get(start..start + length).ok_or_else(|| malformed("TLV", "value runs past the end"))?;
        let path = base.with(kind, id);
        match kind {
            TlvKind::ObjectInstance | TlvKind::MultipleResource => decode_tlv(value, path, out, depth + 1, types)?,
            TlvKind::Resource | TlvKind::ResourceInstance => {
                out.push(Entry { path, value: tlv_value(type_of(types, &path), value)? });
            }
        }
        bytes = &bytes[start + length..];
    }
    Ok(())
}

fn tlv_value(t: Option<ResourceType>, bytes: &[u8]) -> Result<Value, ContentError> {
    let int = |bytes: &[u8]| -> Result<i64, ContentError> {
        match bytes.len() {
            1 => Ok(i64::from(bytes[0] as i8)),
            2 => Ok(i64::from(i16::from_be_bytes([bytes[0], bytes[1]]))),
            4 => Ok(i64::from(i32::from_be_bytes(bytes.try_into().unwrap_or_default()))),
            8 => Ok(i64::from_be_bytes(bytes.try_into().unwrap_or_default())),
            n => Err(malformed("TLV", format!("an integer of {n} bytes"))),
        }
    };
    Ok(match t {
        Some(ResourceType::String) => {
            Value::String(String::from_utf8(bytes.to_vec()).map_err(|_| malformed("TLV", "string not UTF-8"))?)
        }
        Some(ResourceType::Integer) => Value::Integer(int(bytes)?),
        Some(ResourceType::Time) => Value::Time(int(bytes)?),
        Some(ResourceType::Unsigned) => {
            if !matches!(bytes.len(), 1 | 2 | 4 | 8) {
                return Err(malformed("TLV", format!("an unsigned integer of {} bytes", bytes.len())));
            }
            Value::Unsigned(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
        }
        Some(ResourceType::Float) => match bytes.len() {
            4 => Value::Float(f64::from(f32::from_be_bytes(bytes.try_into().unwrap_or_default()))),
            8 => Value::Float(f64::from_be_bytes(bytes.try_into().unwrap_or_default())),
            n => return Err(malformed("TLV", format!("a float of {n} bytes"))),
        },
        Some(ResourceType::Boolean) => match bytes {
            [0] => Value::Boolean(false),
            [1] => Value::Boolean(true),
            _ => return Err(malformed("TLV", "a boolean is one byte, 0 or 1")),
        },
        Some(ResourceType::ObjectLink) => match bytes {
            [a, b, c, d] => Value::ObjectLink(u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d])),
            _ => return Err(malformed("TLV", "an object link is four bytes")),
        },
        Some(ResourceType::Opaque | ResourceType::None) | None => Value::Opaque(bytes.to_vec()),
    })
}

fn tlv_bytes(value: &Value) -> Vec<u8> {
    let int = |v: i64| -> Vec<u8> {
        if let Ok(v) = i8::try_from(v) {
            v.to_be_bytes().to_vec()
        } else if let Ok(v) = i16::try_from(v) {
            v.to_be_bytes().to_vec()
        } else if let Ok(v) = i32::try_from(v) {
            v.to_be_bytes().to_vec()
        } else {
            v.to_be_bytes().to_vec()
        }
    };
    match value {
        Value::Integer(v) | Value::Time(v) => int(*v),
        Value::Unsigned(v) => {
            let bytes = v.to_be_bytes();
            let keep = if *v <= 0xff {
                1
            } else if *v <= 0xffff {
                2
            } else if *v <= 0xffff_ffff {
                4
            } else {
                8
            };
            bytes[8 - keep..].to_vec()
        }
        Value::Float(v) => v.to_be_bytes().to_vec(),
        Value::Boolean(v) => vec![u8::from(*v)],
        Value::String(v) => v.as_bytes().to_vec(),
        Value::Opaque(v) => v.clone(),
        Value::ObjectLink(o, i) => [o.to_be_bytes(), i.to_be_bytes()].concat(),
    }
}

fn tlv(kind: TlvKind, id: u16, value: &[u8]) -> Vec<u8> {
    let mut header = match kind {
        TlvKind::ObjectInstance => 0b00,
        TlvKind::ResourceInstance => 0b01,
        TlvKind::MultipleResource => 0b10,
        TlvKind::Resource => 0b11,
    } << 6;
    let mut out = vec![0];
    if id > 0xff {
        header |= 0x20;
        out.extend_from_slice(&id.to_be_bytes());
    } else {
        out.push(id as u8);
    }
    let len = value.len();
    if len < 8 {
        header |= len as u8;
    } else if len <= 0xff {
        header |= 0b01 << 3;
        out.push(len as u8);
    } else if len <= 0xffff {
        header |= 0b10 << 3;
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        header |= 0b11 << 3;
        out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    }
    out[0] = header;
    out.extend_from_slice(value);
    out
}

fn encode_tlv(base: &Path, entries: &[Entry]) -> Vec<u8> {
    // Resources of one instance (grouping resource instances), wrapped in object-instance
    // TLVs when the request named only the object.
    let mut out = Vec::new();
    let mut instances: Vec<u16> = entries.iter().filter_map(|e| e.path.instance).collect();
    instances.dedup();
    for instance in instances {
        let mut body = Vec::new();
        let of_instance: Vec<&Entry> = entries.iter().filter(|e| e.path.instance == Some(instance)).collect();
        let mut resources: Vec<u16> = of_instance.iter().filter_map(|e| e.path.resource).collect();
        resources.dedup();
        for resource in resources {
            let values: Vec<&&Entry> = of_instance.iter().filter(|e| e.path.resource == Some(resource)).collect();
            match values.as_slice() {
                [single] if single.path.resource_instance.is_none() => {
                    body.extend(tlv(TlvKind::Resource, resource, &tlv_bytes(&single.value)));
                }
                many => {
                    let inner: Vec<u8> = many
                        .iter()
                        .flat_map(|e| {
                            tlv(TlvKind::ResourceInstance, e.path.resource_instance.unwrap_or(0), &tlv_bytes(&e.value))
                        })
                        .collect();
                    body.extend(tlv(TlvKind::MultipleResource, resource, &inner));
                }
            }
        }
        if base.instance.is_none() {
            out.extend(tlv(TlvKind::ObjectInstance, instance, &body));
        } else {
            out.extend(body);
        }
    }
    out
}

/// SenML records as the two encodings share them.
struct Record {
    name: String,
    value: Value,
}

fn records(entries: &[Entry]) -> Vec<Record> {
    entries.iter().map(|e| Record { name: e.path.to_string(), value: e.value.clone() }).collect()
}

fn entry_from(name: &str, value: SenmlValue, types: Types<'_>) -> Result<Entry, ContentError> {
    let path = Path::parse(name)?;
    let value = match value {
        SenmlValue::Number(v) => match type_of(types, &path) {
            Some(ResourceType::Integer) if v.fract() == 0.0 => Value::Integer(v as i64),
            Some(ResourceType::Time) if v.fract() == 0.0 => Value::Time(v as i64),
            Some(ResourceType::Unsigned) if v.fract() == 0.0 && v >= 0.0 => Value::Unsigned(v as u64),
            _ => Value::Float(v),
        },
        SenmlValue::Integer(v) => match type_of(types, &path) {
            Some(ResourceType::Time) => Value::Time(v),
            Some(ResourceType::Unsigned) if v >= 0 => Value::Unsigned(v as u64),
            Some(ResourceType::Float) => Value::Float(v as f64),
            _ => Value::Integer(v),
        },
        SenmlValue::String(v) => Value::String(v),
        SenmlValue::Boolean(v) => Value::Boolean(v),
        SenmlValue::Data(v) => Value::Opaque(v),
        SenmlValue::ObjectLink(v) => {
            let (o, i) = v.split_once(':').ok_or_else(|| malformed("SenML", "vlo is not object:instance"))?;
            let parse = |s: &str| s.parse::<u16>().map_err(|_| malformed("SenML", "vlo is not object:instance"));
            Value::ObjectLink(parse(o)?, parse(i)?)
        }
    };
    Ok(Entry { path, value })
}

enum SenmlValue {
    Number(f64),
    Integer(i64),
    String(String),
    Boolean(bool),
    Data(Vec<u8>),
    ObjectLink(String),
}

fn decode_senml_json(payload: &[u8], types: Types<'_>) -> Result<Vec<Entry>, ContentError> {
    use serde_json::Value as J;
    let json: J = serde_json::from_slice(payload).map_err(|e| malformed("SenML JSON", e.to_string()))?;
    let J::Array(items) = json else { return Err(malformed("SenML JSON", "not an array")) };
    let mut base = String::new();
    let mut out = Vec::new();
    for item in items {
        let J::Object(record) = item else { return Err(malformed("SenML JSON", "a record is not an object")) };
        if let Some(J::String(bn)) = record.get("bn") {
            base = bn.clone();
        }
        let name = format!("{base}{}", record.get("n").and_then(J::as_str).unwrap_or(""));
        let value = if let Some(v) = record.get("v") {
            match (v.as_i64(), v.as_f64()) {
                (Some(i), _) => SenmlValue::Integer(i),
                (None, Some(f)) => SenmlValue::Number(f),
                _ => return Err(malformed("SenML JSON", "v is not a number")),
            }
        } else if let Some(J::String(s)) = record.get("vs") {
            SenmlValue::String(s.clone())
        } else if let Some(J::Bool(b)) = record.get("vb") {
            SenmlValue::Boolean(*b)
        } else if let Some(J::String(d)) = record.get("vd") {
            SenmlValue::Data(base64url_decode(d).ok_or_else(|| malformed("SenML JSON", "vd is not base64url"))?)
        } else if let Some(J::String(l)) = record.get("vlo") {
            SenmlValue::ObjectLink(l.clone())
        } else {
            continue; // a record without a value (a base record)
        };
        out.push(entry_from(&name, value, types)?);
    }
    Ok(out)
}

/// The base name to emit and each record's name: a base name (which applies to every later
/// record) only when every entry lies under `base`.
fn names(base: &Path, entries: &[Entry]) -> (Option<String>, Vec<Record>) {
    let base_name = format!("{base}/");
    let all_under = !entries.is_empty() && entries.iter().all(|e| e.path.to_string().starts_with(&base_name));
    let records = records(entries)
        .into_iter()
        .map(|r| match r.name.strip_prefix(&base_name) {
            Some(relative) if all_under => Record { name: relative.to_string(), value: r.value },
            _ => r,
        })
        .collect();
    (all_under.then_some(base_name), records)
}

fn encode_senml_json(base: &Path, entries: &[Entry]) -> Vec<u8> {
    use serde_json::{json, Value as J};
    let (base_name, records) = names(base, entries);
    let items: Vec<J> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut record = serde_json::Map::new();
            if let (0, Some(bn)) = (i, &base_name) {
                record.insert("bn".into(), json!(bn));
            }
            record.insert("n".into(), json!(r.name));
            let (key, value) = match r.value {
                Value::Integer(v) | Value::Time(v) => ("v", json!(v)),
                Value::Unsigned(v) => ("v", json!(v)),
                Value::Float(v) => ("v", json!(v)),
                Value::Boolean(v) => ("vb", json!(v)),
                Value::String(v) => ("vs", json!(v)),
                Value::Opaque(v) => ("vd", json!(base64url_encode(&v))),
                Value::ObjectLink(o, i) => ("vlo", json!(format!("{o}:{i}"))),
            };
            record.insert(key.into(), value);
            J::Object(record)
        })
        .collect();
    serde_json::to_vec(&items).unwrap_or_default()
}

/// SenML CBOR labels (RFC 8428 §6).
const BN: i64 = -2;
const N: i64 = 0;
const V: i64 = 2;
const VS: i64 = 3;
const VB: i64 = 4;
const VD: i64 = 8;

fn decode_senml_cbor(payload: &[u8], types: Types<'_>) -> Result<Vec<Entry>, ContentError> {
    use ciborium::Value as C;
    let value: C = ciborium::from_reader(payload).map_err(|e| malformed("SenML CBOR", e.to_string()))?;
    let C::Array(items) = value else { return Err(malformed("SenML CBOR", "not an array")) };
    let mut base = String::new();
    let mut out = Vec::new();
    for item in items {
        let C::Map(fields) = item else { return Err(malformed("SenML CBOR", "a record is not a map")) };
        let mut name = String::new();
        let mut value = None;
        for (key, field) in fields {
            let label = match &key {
                C::Integer(i) => i64::try_from(*i).ok(),
                C::Text(t) if t == "vlo" => Some(i64::MIN),
                _ => None,
            };
            match (label, field) {
                (Some(BN), C::Text(t)) => base = t,
                (Some(N), C::Text(t)) => name = t,
                (Some(V), C::Integer(i)) => value = Some(SenmlValue::Integer(i64::try_from(i).unwrap_or(i64::MAX))),
                (Some(V), C::Float(f)) => value = Some(SenmlValue::Number(f)),
                (Some(VS), C::Text(t)) => value = Some(SenmlValue::String(t)),
                (Some(VB), C::Bool(b)) => value = Some(SenmlValue::Boolean(b)),
                (Some(VD), C::Bytes(b)) => value = Some(SenmlValue::Data(b)),
                (Some(i64::MIN), C::Text(t)) => value = Some(SenmlValue::ObjectLink(t)),
                _ => {}
            }
        }
        if let Some(value) = value {
            out.push(entry_from(&format!("{base}{name}"), value, types)?);
        }
    }
    Ok(out)
}

fn encode_senml_cbor(base: &Path, entries: &[Entry]) -> Result<Vec<u8>, ContentError> {
    use ciborium::Value as C;
    let (base_name, records) = names(base, entries);
    let items: Vec<C> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut fields = Vec::new();
            if let (0, Some(bn)) = (i, &base_name) {
                fields.push((C::Integer(BN.into()), C::Text(bn.clone())));
            }
            fields.push((C::Integer(N.into()), C::Text(r.name)));
            let value = match r.value {
                Value::Integer(v) | Value::Time(v) => (C::Integer(V.into()), C::Integer(v.into())),
                Value::Unsigned(v) => (C::Integer(V.into()), C::Integer(v.into())),
                Value::Float(v) => (C::Integer(V.into()), C::Float(v)),
                Value::Boolean(v) => (C::Integer(VB.into()), C::Bool(v)),
                Value::String(v) => (C::Integer(VS.into()), C::Text(v)),
                Value::Opaque(v) => (C::Integer(VD.into()), C::Bytes(v)),
                Value::ObjectLink(o, i) => (C::Text("vlo".into()), C::Text(format!("{o}:{i}"))),
            };
            fields.push(value);
            C::Map(fields)
        })
        .collect();
    let mut out = Vec::new();
    ciborium::into_writer(&C::Array(items), &mut out).map_err(|e| malformed("SenML CBOR", e.to_string()))?;
    Ok(out)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64url_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(char::from(B64[((n >> (18 - 6 * i)) & 0x3f) as usize]));
        }
    }
    out
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {

    #[test]
    fn composite_paths_round_trip_and_bad_ones_are_refused() {
        let paths = vec![Path::parse("/3/0/0").unwrap(), Path::parse("/3303/0/5700").unwrap()];
        for f in [format::SENML_ETCH_JSON, format::SENML_ETCH_CBOR] {
            assert_eq!(decode_paths(f, &encode_paths(f, &paths).unwrap()).unwrap(), paths);
        }
        let with_base = br#"[{"bn": "/3/0/", "n": "0"}, {"n": "9"}]"#;
        let decoded = decode_paths(format::SENML_ETCH_JSON, with_base).unwrap();
        assert_eq!(decoded.iter().map(ToString::to_string).collect::<Vec<_>>(), ["/3/0/0", "/3/0/9"]);
        assert!(decode_paths(format::SENML_ETCH_JSON, b"[]").is_err());
        assert!(decode_paths(format::SENML_ETCH_JSON, br#"[{"n": "/x"}]"#).is_err());
        assert!(decode_paths(format::SENML_ETCH_CBOR, &[0xff]).is_err());
        assert!(matches!(decode_paths(format::TEXT, b""), Err(ContentError::Unsupported(0))));
    }
    use super::*;

    fn device() -> Vec<Entry> {
        let p = |s: &str| Path::parse(s).unwrap();
        vec![
            Entry { path: p("/3/0/0"), value: Value::String("Open Mobile Alliance".into()) },
            Entry { path: p("/3/0/1"), value: Value::String("Lightweight M2M Client".into()) },
            Entry { path: p("/3/0/2"), value: Value::String("345000123".into()) },
            Entry { path: p("/3/0/3"), value: Value::String("1.0".into()) },
            Entry { path: p("/3/0/6/0"), value: Value::Integer(1) },
            Entry { path: p("/3/0/6/1"), value: Value::Integer(5) },
            Entry { path: p("/3/0/7/0"), value: Value::Integer(3800) },
            Entry { path: p("/3/0/7/1"), value: Value::Integer(5000) },
            Entry { path: p("/3/0/8/0"), value: Value::Integer(125) },
            Entry { path: p("/3/0/8/1"), value: Value::Integer(900) },
            Entry { path: p("/3/0/9"), value: Value::Integer(100) },
            Entry { path: p("/3/0/10"), value: Value::Integer(15) },
            Entry { path: p("/3/0/11/0"), value: Value::Integer(0) },
            Entry { path: p("/3/0/13"), value: Value::Time(1_367_491_215) },
            Entry { path: p("/3/0/14"), value: Value::String("+02:00".into()) },
            Entry { path: p("/3/0/16"), value: Value::String("U".into()) },
        ]
    }

    /// The Device object instance example of OMA-TS-LightweightM2M_Core (TLV section).
    const SPEC_TLV: &str = "c800144f70656e204d6f62696c6520416c6c69616e6365\
        c801164c69676874776569676874204d324d20436c69656e74\
        c80209333435303030313233\
        c303312e30\
        86064100014101 05\
        880708420 00ed842011388\
        870841007d42010384\
        c10964\
        c10a0f\
        830b410000\
        c40d5182428f\
        c60e2b30323a3030\
        c11055";

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn decodes_the_specifications_device_tlv() {
        let entries = decode(format::TLV, &Path::parse("/3/0").unwrap(), &hex(SPEC_TLV)).unwrap();
        assert_eq!(entries, device());
    }

    #[test]
    fn every_format_round_trips_the_device_object() {
        let base = Path::parse("/3/0").unwrap();
        for f in [format::TLV, format::SENML_JSON, format::SENML_CBOR] {
            let bytes = encode(f, &base, &device()).unwrap();
            assert_eq!(decode(f, &base, &bytes).unwrap(), device(), "format {f}");
        }
        // Object-level TLV wraps instances.
        let object = Path::parse("/3").unwrap();
        let bytes = encode(format::TLV, &object, &device()).unwrap();
        assert_eq!(bytes[0] >> 6, 0, "object instance TLV");
        assert_eq!(decode(format::TLV, &object, &bytes).unwrap(), device());
    }

    #[test]
    fn text_is_typed_by_the_model() {
        let p = |s: &str| Path::parse(s).unwrap();
        assert_eq!(decode(format::TEXT, &p("/3/0/9"), b"87").unwrap()[0].value, Value::Integer(87));
        assert_eq!(decode(format::TEXT, &p("/1/0/6"), b"1").unwrap()[0].value, Value::Boolean(true));
        assert_eq!(decode(format::TEXT, &p("/3/0/0"), b"ACME").unwrap()[0].value, Value::String("ACME".into()));
        assert_eq!(decode(format::TEXT, &p("/9/0/0"), b"x").unwrap()[0].value, Value::String("x".into()));
        assert!(decode(format::TEXT, &p("/3/0/9"), b"lots").is_err());
        let one = [Entry { path: p("/3/0/13"), value: Value::Time(42) }];
        assert_eq!(encode(format::TEXT, &p("/3/0/13"), &one).unwrap(), b"42");
    }

    #[test]
    fn senml_json_with_base_names_and_all_value_kinds() {
        let json = br#"[{"bn":"/3/0/","n":"0","vs":"ACME"},{"n":"9","v":42},{"n":"13","v":1700000000},
            {"bn":"/1/0/","n":"6","vb":true},{"n":"10","vlo":"11:0"},{"bn":"/0/0/","n":"3","vd":"AQID"}]"#;
        let entries = decode(format::SENML_JSON, &Path::parse("/0").unwrap(), json).unwrap();
        let values: Vec<String> = entries.iter().map(|e| format!("{} {:?}", e.path, e.value)).collect();
        assert_eq!(
            values,
            [
                "/3/0/0 String(\"ACME\")",
                "/3/0/9 Integer(42)",
                "/3/0/13 Time(1700000000)",
                "/1/0/6 Boolean(true)",
                "/1/0/10 ObjectLink(11, 0)",
                "/0/0/3 Opaque([1, 2, 3])"
            ]
        );
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        let base = Path::parse("/3/0").unwrap();
        let tlv = hex(SPEC_TLV);
        for cut in 0..tlv.len() {
            let _ = decode(format::TLV, &base, &tlv[..cut]);
        }
        for bad in
            [&b"["[..], b"{}", b"[1]", b"[{\"n\":\"x\",\"v\":1}]", b"[{\"bn\":\"/3/0/\",\"n\":\"9\",\"v\":\"s\"}]"]
        {
            assert!(decode(format::SENML_JSON, &base, bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        for bad in [&[0xff][..], &[0x81, 0x01], &[0x9f]] {
            assert!(decode(format::SENML_CBOR, &base, bad).is_err());
        }
        assert!(decode(9999, &base, b"").is_err());
        // Deep nesting is refused, not recursed into.
        let mut nested = vec![0x03, 0x00]; // innermost value
        for _ in 0..10 {
            let mut outer = vec![0x08, 0x00, nested.len() as u8];
            outer.extend(&nested);
            nested = outer;
        }
        assert!(decode(format::TLV, &base, &nested).is_err());
    }
}
