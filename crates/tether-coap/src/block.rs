//! Block-wise transfers (RFC 7959): the Block1/Block2 option value, the blocks of a large
//! request body, and the reassembly of one on the receiving side.
//!
//! Hand-written rather than taken from coap-lite's `BlockHandler`: that handler serves
//! Block2 responses of a server; tether needs the Block1 *request* side on the LwM2M server
//! (a firmware package pushed to a device) and Block1 reassembly on a sans-IO device client
//! whose message layer is its own.

use coap_lite::{CoapOption, MessageClass, Packet, ResponseType};

use crate::packet::encode_uint;

/// A Block1 or Block2 option: block number, whether more follow, size exponent (size
/// `16 << szx`, 16 to 1024 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockOption {
    /// The block's number (its offset is `number * size`).
    pub number: u32,
    /// More blocks follow.
    pub more: bool,
    /// Size exponent: 0 (16 bytes) to 6 (1024 bytes).
    pub szx: u8,
}

impl BlockOption {
    /// The block size in bytes.
    pub fn size(self) -> usize {
        16 << self.szx
    }

    /// Parses an option value (at most 3 bytes; szx 7 is reserved).
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() > 3 {
            return None;
        }
        let v = value.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
        let szx = (v & 0x7) as u8;
        (szx < 7).then_some(Self { number: v >> 4, more: v & 0x8 != 0, szx })
    }

    /// The option value in its shortest form.
    pub fn encode(self) -> Vec<u8> {
        encode_uint((self.number << 4) | (u32::from(self.more) << 3) | u32::from(self.szx))
    }
}

/// The size exponent of 1024-byte blocks: with CoAP and DTLS headers a block still fits the
/// IPv6 minimum MTU (1280).
pub const DEFAULT_SZX: u8 = 6;

/// The block of `request`'s body starting at `offset`, `16 << szx` bytes, as a request of
/// its own with a Block1 option (and Size1, the whole body's size, on the first block).
pub fn block1_request(request: &Packet, offset: usize, szx: u8) -> Packet {
    let size = 16usize << szx;
    let end = (offset + size).min(request.payload.len());
    let mut block = request.clone();
    block.payload = request.payload[offset.min(end)..end].to_vec();
    block.clear_option(CoapOption::Block1);
    let option = BlockOption { number: (offset / size) as u32, more: end < request.payload.len(), szx };
    block.add_option(CoapOption::Block1, option.encode());
    if offset == 0 {
        block.add_option(CoapOption::Size1, encode_uint(request.payload.len() as u32));
    }
    block
}

/// A request body arriving in Block1 blocks (the receiving side): blocks must come in order
/// (RFC 7959 §2.5 lets a server insist); a block 0 starts the body again.
#[derive(Debug, Default)]
pub struct Reassembly {
    /// What identifies the request the blocks belong to (method, Uri-Path, Content-Format).
    key: Vec<u8>,
    body: Vec<u8>,
    next: u32,
    active: bool,
}

/// What became of a Block1 block.
#[derive(Debug)]
pub enum BlockOutcome {
    /// More blocks are expected: answer with this (2.31 Continue and the Block1 option).
    Continue(Packet),
    /// The body is whole: the original request with all of it, and the Block1 option the
    /// final response must carry.
    Complete(Packet, BlockOption),
    /// Out of order or too large: answer with this (4.08 or 4.13).
    Refused(Packet),
}

impl Reassembly {
    /// Whether a body is being received.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Takes one request carrying a Block1 option; bodies beyond `limit` bytes are refused
    /// (4.13 with Size1 = `limit`).
    pub fn accept(&mut self, request: &Packet, block: BlockOption, limit: usize) -> BlockOutcome {
        let key = request_key(request);
        if block.number == 0 {
            *self = Self { key: key.clone(), body: Vec::new(), next: 0, active: true };
        }
        let in_order = self.active && self.key == key && block.number == self.next;
        if !in_order {
            return BlockOutcome::Refused(answer(ResponseType::RequestEntityIncomplete));
        }
        let announced = request
            .get_first_option(CoapOption::Size1)
            .map(|v| v.iter().fold(0usize, |a, b| (a << 8) | usize::from(*b)));
        if self.body.len() + request.payload.len() > limit || announced.is_some_and(|size| size > limit) {
            *self = Self::default();
            let mut refused = answer(ResponseType::RequestEntityTooLarge);
            refused.add_option(CoapOption::Size1, encode_uint(limit as u32));
            return BlockOutcome::Refused(refused);
        }
        self.body.extend_from_slice(&request.payload);
        self.next += 1;
        if block.more {
            let mut proceed = answer(ResponseType::Continue);
            proceed.add_option(CoapOption::Block1, block.encode());
            return BlockOutcome::Continue(proceed);
        }
        let mut whole = request.clone();
        whole.clear_option(CoapOption::Block1);
        whole.clear_option(CoapOption::Size1);
        whole.payload = std::mem::take(&mut self.body);
        *self = Self::default();
        BlockOutcome::Complete(whole, block)
    }
}

fn answer(code: ResponseType) -> Packet {
    let mut packet = Packet::new();
    packet.header.code = MessageClass::Response(code);
    packet
}

/// Method, Uri-Path and Content-Format: blocks of one body share them.
fn request_key(request: &Packet) -> Vec<u8> {
    let mut key = vec![u8::from(request.header.code)];
    for option in [CoapOption::UriPath, CoapOption::ContentFormat] {
        for value in request.get_option(option).into_iter().flatten() {
            key.push(value.len() as u8);
            key.extend_from_slice(value);
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::request;
    use coap_lite::RequestType;

    fn code(packet: &Packet) -> MessageClass {
        packet.header.code
    }

    #[test]
    fn options_round_trip_and_reject_the_reserved_size() {
        let option = BlockOption { number: 1000, more: true, szx: 6 };
        assert_eq!(BlockOption::parse(&option.encode()), Some(option));
        assert_eq!(BlockOption::parse(&[0x07]), None);
        assert_eq!(BlockOption::parse(&[1, 2, 3, 4]), None);
        assert_eq!(BlockOption { number: 0, more: false, szx: 0 }.encode(), Vec::<u8>::new());
    }

    #[test]
    fn a_body_split_into_blocks_is_reassembled_whole() {
        let body: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let original = request(RequestType::Put, "/5/0/0", Some(42), body.clone());
        let mut reassembly = Reassembly::default();
        let mut offset = 0;
        loop {
            let block = block1_request(&original, offset, 6);
            let option = BlockOption::parse(block.get_first_option(CoapOption::Block1).unwrap()).unwrap();
            assert_eq!(block.get_first_option(CoapOption::Size1).is_some(), offset == 0);
            match reassembly.accept(&block, option, 4096) {
                BlockOutcome::Continue(answer) => {
                    assert_eq!(code(&answer), MessageClass::Response(ResponseType::Continue));
                    offset += 1024;
                }
                BlockOutcome::Complete(whole, last) => {
                    assert_eq!(whole.payload, body);
                    assert_eq!(last.number, 2);
                    assert!(whole.get_first_option(CoapOption::Block1).is_none());
                    break;
                }
                BlockOutcome::Refused(answer) => panic!("refused: {}", code(&answer)),
            }
        }
        assert!(!reassembly.is_active());
    }

    #[test]
    fn blocks_out_of_order_or_beyond_the_limit_are_refused() {
        let original = request(RequestType::Put, "/5/0/0", Some(42), vec![7; 3000]);
        let mut reassembly = Reassembly::default();
        let second = block1_request(&original, 1024, 6);
        let option = BlockOption::parse(second.get_first_option(CoapOption::Block1).unwrap()).unwrap();
        let BlockOutcome::Refused(answer) = reassembly.accept(&second, option, 4096) else { panic!() };
        assert_eq!(code(&answer), MessageClass::Response(ResponseType::RequestEntityIncomplete));
        // Size1 on the first block announces more than the limit: refused at once.
        let first = block1_request(&original, 0, 6);
        let option = BlockOption::parse(first.get_first_option(CoapOption::Block1).unwrap()).unwrap();
        let BlockOutcome::Refused(answer) = reassembly.accept(&first, option, 2048) else { panic!() };
        assert_eq!(code(&answer), MessageClass::Response(ResponseType::RequestEntityTooLarge));
        assert!(!reassembly.is_active());
        // A block of another request does not continue this body.
        let _ = reassembly.accept(&first, option, 4096);
        let other = request(RequestType::Put, "/3/0/14", Some(42), vec![1; 2000]);
        let block = block1_request(&other, 1024, 6);
        let option = BlockOption::parse(block.get_first_option(CoapOption::Block1).unwrap()).unwrap();
        assert!(matches!(reassembly.accept(&block, option, 4096), BlockOutcome::Refused(_)));
    }
}
