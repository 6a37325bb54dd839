//! CoAP (RFC 7252) message layer and LwM2M server logic, sans-IO.
//!
//! - [`message`]: one peer's CoAP message layer: confirmable retransmission, tokens,
//!   piggybacked and separate responses, deduplication, resets, observe notifications.
//! - [`content`]: LwM2M content formats (text, opaque, TLV, SenML JSON, SenML CBOR) to and
//!   from typed values, typed by the object models.
//! - [`model`]: object models (names, types, operations): the core OMA objects 0–7 and
//!   common IPSO objects built in, more from OMA DDF XML files.
//! - [`link_format`]: CoRE link format (RFC 6690), as LwM2M registration bodies use it.
//! - [`packet`]: requests and uint option values.
//! - [`block`]: block-wise transfers (RFC 7959): large request bodies sent and reassembled.
//! - [`bootstrap`]: client-initiated bootstrap: what a bootstrap server sends, and the
//!   device's side.
//! - [`registration`]: the LwM2M registration interface: requests, authorization, the registry
//!   with lifetimes.
//!
//! The wire format is `coap-lite`'s [`Packet`](coap_lite::Packet); what it lacks (the
//! message layer with injected time) is written here. Nothing here opens a socket or reads a
//! clock.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use coap_lite;

pub mod block;
pub mod bootstrap;
pub mod content;
pub mod device;
pub mod link_format;
pub mod message;
pub mod model;
pub mod packet;
pub mod registration;
mod small_map;
