//! CoRE link format (RFC 6690) as LwM2M uses it: `</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>`.
//!
//! The parser reads what a device sent: it returns an error for malformed input and never
//! panics.

use std::fmt;

/// One link: a target path and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The URI reference between `<` and `>`.
    pub target: String,
    /// Attributes in order; a value-less attribute has `None`.
    pub attributes: Vec<(String, Option<String>)>,
}

impl Link {
    /// The value of attribute `name`, unquoted.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.as_deref())
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}>", self.target)?;
        for (name, value) in &self.attributes {
            match value {
                None => write!(f, ";{name}")?,
                Some(v) if v.parse::<f64>().is_ok() => write!(f, ";{name}={v}")?,
                Some(v) => write!(f, ";{name}=\"{v}\"")?,
            }
        }
        Ok(())
    }
}

/// Link-format input that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed link format at byte {at}: {what}")]
pub struct LinkFormatError {
    /// Byte offset.
    pub at: usize,
    /// What was expected.
    pub what: &'static str,
}

/// Longest body accepted (a registration lists objects, not a novel).
pub const MAX_LEN: usize = 16 * 1024;

/// Parses a link-format document.
pub fn parse(input: &str) -> Result<Vec<Link>, LinkFormatError> {
    if input.len() > MAX_LEN {
        return Err(LinkFormatError { at: MAX_LEN, what: "document too long" });
    }
    let bytes = input.as_bytes();
    let mut links = Vec::new();
    let mut i = skip_ws(bytes, 0);
    if i == bytes.len() {
        return Ok(links);
    }
    loop {
        if bytes.get(i) != Some(&b'<') {
            return Err(LinkFormatError { at: i, what: "'<'" });
        }
        let close = input[i + 1..].find('>').ok_or(LinkFormatError { at: i, what: "'>'" })? + i + 1;
        let target = input[i + 1..close].to_string();
        if target.contains(['<', ',', '"']) {
            return Err(LinkFormatError { at: i + 1, what: "a URI reference" });
        }
        i = close + 1;
        let mut attributes = Vec::new();
        loop {
            i = skip_ws(bytes, i);
            if bytes.get(i) != Some(&b';') {
                break;
            }
            i = skip_ws(bytes, i + 1);
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || b"!#$&+-.^_`|~*".contains(&bytes[i])) {
                i += 1;
            }
            if i == start {
                return Err(LinkFormatError { at: i, what: "an attribute name" });
            }
            let name = input[start..i].to_string();
            let value = if bytes.get(i) == Some(&b'=') {
                i += 1;
                if bytes.get(i) == Some(&b'"') {
                    let end =
                        input[i + 1..].find('"').ok_or(LinkFormatError { at: i, what: "a closing quote" })? + i + 1;
                    let v = &input[i + 1..end];
                    if v.chars().any(char::is_control) {
                        return Err(LinkFormatError { at: i + 1, what: "a quoted string without control characters" });
                    }
                    i = end + 1;
                    Some(v.to_string())
                } else {
                    // RFC 6690 ptoken: no quote, no control characters, no separators.
                    let start = i;
                    while i < bytes.len() && is_ptoken_char(bytes[i]) {
                        i += 1;
                    }
                    if i == start {
                        return Err(LinkFormatError { at: i, what: "a value" });
                    }
                    Some(input[start..i].to_string())
                }
            } else {
                None
            };
            attributes.push((name, value));
        }
        // Registrations keep their links for their lifetime: no spare capacity.
        attributes.shrink_to_fit();
        links.push(Link { target, attributes });
        i = skip_ws(bytes, i);
        match bytes.get(i) {
            None => {
                links.shrink_to_fit();
                return Ok(links);
            }
            Some(b',') => i = skip_ws(bytes, i + 1),
            Some(_) => return Err(LinkFormatError { at: i, what: "',' or the end" }),
        }
    }
}

/// RFC 6690 §2 `ptokenchar`.
fn is_ptoken_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'()*+-./:<=>?@[]^_`{|}~".contains(&b)
}

fn skip_ws(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() && bytes[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Serialises links.
pub fn format(links: &[Link]) -> String {
    links.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_lwm2m_registration_body() {
        let links = parse(r#"</>;rt="oma.lwm2m";ct=11543, </1/0>,</3/0>,</3/0/1>;dim=2,</5>"#).unwrap();
        assert_eq!(links.len(), 5);
        assert_eq!(links[0].target, "/");
        assert_eq!(links[0].attribute("rt"), Some("oma.lwm2m"));
        assert_eq!(links[0].attribute("ct"), Some("11543"));
        assert_eq!(links[3].attribute("dim"), Some("2"));
        assert_eq!(links[4].target, "/5");
        let again = parse(&format(&links)).unwrap();
        assert_eq!(again, links, "format round-trips");
    }

    #[test]
    fn empty_and_flag_attributes() {
        assert_eq!(parse("  ").unwrap(), vec![]);
        let links = parse("</3/0>;obs").unwrap();
        assert_eq!(links[0].attributes, vec![("obs".to_string(), None)]);
    }

    #[test]
    fn malformed_documents_are_errors_not_panics() {
        for bad in [
            "<",
            "</1",
            "</1>,",
            "</1>;",
            "</1>;=3",
            "</1>;a=\"open",
            "/1",
            "</1> </2>",
            "<\u{e9}",
            "</1>;\u{e9}=1",
            "</1>;a=",
            "</>;rt=L/\u{1}\0\0\"\0",
            "</>;rt=\"a\u{7}b\"",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        // Every prefix of a valid document parses or fails cleanly.
        let doc = r#"</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>"#;
        for cut in 0..doc.len() {
            let _ = parse(&doc[..cut]);
        }
    }
}
