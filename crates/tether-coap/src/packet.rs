//! Requests and uint option values (RFC 7252 §3.2), as the server and the device build and
//! read them.

use coap_lite::{CoapOption, MessageClass, Packet, RequestType};

/// A request with `path`'s segments as Uri-Path options, and a Content-Format if given.
pub fn request(method: RequestType, path: &str, content_format: Option<u16>, payload: Vec<u8>) -> Packet {
    let mut packet = Packet::new();
    packet.header.code = MessageClass::Request(method);
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    if let Some(cf) = content_format {
        packet.add_option(CoapOption::ContentFormat, encode_uint(u32::from(cf)));
    }
    packet.payload = payload;
    packet
}

/// A uint option value in its shortest form (0 is empty).
pub fn encode_uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(4);
    bytes[first..].to_vec()
}

/// A uint option of at most two bytes (Content-Format, Accept); `None` if longer.
pub fn decode_uint(bytes: &[u8]) -> Option<u16> {
    (bytes.len() <= 2).then(|| bytes.iter().fold(0u16, |acc, b| (acc << 8) | u16::from(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uints_are_shortest_and_round_trip() {
        assert_eq!(encode_uint(0), Vec::<u8>::new());
        assert_eq!(encode_uint(112), vec![112]);
        assert_eq!(encode_uint(11542), vec![0x2d, 0x16]);
        assert_eq!(decode_uint(&encode_uint(11542)), Some(11542));
        assert_eq!(decode_uint(&[]), Some(0));
        assert_eq!(decode_uint(&[1, 2, 3]), None);
    }
}
