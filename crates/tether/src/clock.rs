//! The one place the tokio crate reads the clock, so `start_paused` tests control all time
//! the state machines see (OpenSSL's own DTLS retransmission timer excepted).

/// Now, as the state machines take it.
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// A state machine's deadline, as tokio sleeps take it.
pub(crate) fn deadline(at: std::time::Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(at)
}
