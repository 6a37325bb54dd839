//! The OpenSSL calls the `openssl` crate does not bind, declared and wrapped here.
//!
//! This is the only module of `tether-proto` that contains `unsafe` code. Every function
//! takes a reference to a live `SslRef`, so the pointer handed to libssl is valid for the
//! duration of the call; each `unsafe` block says what else it relies on.

use std::os::raw::{c_int, c_long, c_uint, c_void};
use std::time::Duration;

use foreign_types_shared::ForeignTypeRef;
use openssl::ssl::SslContextBuilder;
use openssl::ssl::SslRef;
use openssl_sys::{SSL, SSL_CTX};

/// OpenSSL's opaque `BIO_ADDR`.
#[repr(C)]
struct BIO_ADDR {
    _opaque: [u8; 0],
}

/// `DTLS_CTRL_GET_TIMEOUT` from `ssl.h` (the macro `DTLSv1_get_timeout`).
const DTLS_CTRL_GET_TIMEOUT: c_int = 73;
/// `DTLS_CTRL_HANDLE_TIMEOUT` from `ssl.h` (the macro `DTLSv1_handle_timeout`).
const DTLS_CTRL_HANDLE_TIMEOUT: c_int = 74;
/// `SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN`.
const SHUTDOWN_SENT_AND_RECEIVED: c_int = 1 | 2;

/// The signature of `DTLS_timer_cb`: given the current timeout in microseconds (0 when a
/// flight is first sent), return the next one.
type TimerCallback = unsafe extern "C" fn(ssl: *mut SSL, timer_us: c_uint) -> c_uint;

extern "C" {
    fn DTLSv1_listen(ssl: *mut SSL, client: *mut BIO_ADDR) -> c_int;
    fn BIO_ADDR_new() -> *mut BIO_ADDR;
    fn BIO_ADDR_free(addr: *mut BIO_ADDR);
    fn DTLS_set_timer_cb(ssl: *mut SSL, cb: TimerCallback);
    fn SSL_CTX_use_psk_identity_hint(ctx: *mut SSL_CTX, hint: *const std::os::raw::c_char) -> c_int;
    fn SSL_get_pending_cipher(ssl: *const SSL) -> *const openssl_sys::SSL_CIPHER;
}

/// Runs `DTLSv1_listen` on a fresh server `SSL` whose read BIO holds one ClientHello that
/// carries a cookie. Returns true when OpenSSL accepted the cookie (through the context's
/// verify callback) and buffered the ClientHello so that `SSL_accept` continues from it with
/// the handshake sequence numbers a stateless HelloVerifyRequest requires.
pub(crate) fn listen(ssl: &SslRef) -> bool {
    // SAFETY: BIO_ADDR_new returns an owned address or NULL; DTLSv1_listen must never be
    // given NULL (it calls BIO_ADDR_clear on it), so a NULL is handled before the call, and
    // the address is freed exactly once below. `ssl` is a live SSL with a BIO attached.
    unsafe {
        let client = BIO_ADDR_new();
        if client.is_null() {
            return false;
        }
        let ret = DTLSv1_listen(ssl.as_ptr(), client);
        BIO_ADDR_free(client);
        ret == 1
    }
}

/// Installs the retransmission-timer callback (`DTLS_set_timer_cb`), which asks
/// [`super::config::next_retransmit_us`] for every timeout.
pub(crate) fn install_retransmit_timer(ssl: &SslRef) {
    // SAFETY: `ssl` is live; the callback is a plain function with the C signature libssl
    // expects and lives for the whole program.
    unsafe { DTLS_set_timer_cb(ssl.as_ptr(), retransmit_trampoline) }
}

unsafe extern "C" fn retransmit_trampoline(ssl: *mut SSL, timer_us: c_uint) -> c_uint {
    // SAFETY: libssl passes the live SSL the callback was installed on; the reference does
    // not outlive this call. The callee cannot unwind (no panicking operations).
    let ssl = unsafe { SslRef::from_ptr(ssl) };
    super::config::next_retransmit_us(ssl, timer_us)
}

/// Time left on OpenSSL's DTLS retransmission timer (`DTLSv1_get_timeout`), or `None` when
/// no timer runs. OpenSSL measures it on the wall clock and reports less than 15 ms as zero.
pub(crate) fn dtls_timeout(ssl: &SslRef) -> Option<Duration> {
    let mut remaining = libc::timeval { tv_sec: 0, tv_usec: 0 };
    // SAFETY: command 73 writes one `struct timeval` through `parg`, which points at a live,
    // properly aligned timeval for the duration of the call.
    let running = unsafe {
        openssl_sys::SSL_ctrl(
            ssl.as_ptr(),
            DTLS_CTRL_GET_TIMEOUT,
            0,
            (&mut remaining as *mut libc::timeval).cast::<c_void>(),
        )
    };
    if running != 1 {
        return None;
    }
    let secs = u64::try_from(remaining.tv_sec).unwrap_or(0);
    let micros = u32::try_from(remaining.tv_usec).unwrap_or(0);
    Some(Duration::from_secs(secs) + Duration::from_micros(u64::from(micros)))
}

/// Lets OpenSSL retransmit if its timer has expired (`DTLSv1_handle_timeout`). Returns
/// `Err(())` when OpenSSL gave up (too many timeouts) or failed.
pub(crate) fn handle_dtls_timeout(ssl: &SslRef) -> Result<bool, ()> {
    // SAFETY: command 74 takes no argument pointer; `ssl` is live with its BIO attached.
    let ret: c_long = unsafe { openssl_sys::SSL_ctrl(ssl.as_ptr(), DTLS_CTRL_HANDLE_TIMEOUT, 0, std::ptr::null_mut()) };
    match ret {
        r if r < 0 => Err(()),
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// Marks the connection as cleanly shut down in both directions, so that freeing it keeps
/// its session in the cache (`SSL_free` drops sessions of connections not shut down).
pub(crate) fn mark_shut_down(ssl: &SslRef) {
    // SAFETY: `ssl` is live; SSL_set_shutdown only sets flags.
    unsafe { openssl_sys::SSL_set_shutdown(ssl.as_ptr(), SHUTDOWN_SENT_AND_RECEIVED) }
}

/// Offers `session` for resumption on `ssl` (`SSL_set_session`).
pub(crate) fn set_session(
    ssl: &mut SslRef,
    session: &openssl::ssl::SslSessionRef,
) -> Result<(), openssl::error::ErrorStack> {
    // SAFETY: the caller (Session::start_client) only passes sessions saved from a session
    // of the same DtlsContext, hence the same SSL_CTX, which is what SSL_set_session requires.
    unsafe { ssl.set_session(session) }
}

/// Makes a server context resume sessions from `cache` (OpenSSL's get-session callback,
/// asked for a session ID a client offers when the internal cache is off).
pub(crate) fn serve_sessions_from(
    builder: &mut SslContextBuilder,
    cache: std::sync::Arc<std::sync::Mutex<super::resumption::ResumptionCache>>,
) {
    let lookup = move |_: &mut SslRef, session_id: &[u8]| {
        let cache = super::config::lock(&cache);
        let session = cache.get(session_id).and_then(|der| openssl::ssl::SslSession::from_der(der).ok())?;
        (session.id() == session_id).then_some(session)
    };
    // SAFETY: the callback returns sessions decoded from DER, which belong to no context;
    // the requirement is only that a returned session not belong to a *different* context.
    unsafe { builder.set_get_session_callback(lookup) }
}

/// Sets the PSK identity hint a server sends (`SSL_CTX_use_psk_identity_hint`).
pub(crate) fn use_psk_identity_hint(
    builder: &mut SslContextBuilder,
    hint: &std::ffi::CStr,
) -> Result<(), openssl::error::ErrorStack> {
    // SAFETY: the builder owns a live SSL_CTX; OpenSSL copies the NUL-terminated hint.
    let ok = unsafe { SSL_CTX_use_psk_identity_hint(builder.as_ptr(), hint.as_ptr()) };
    if ok == 1 {
        Ok(())
    } else {
        Err(openssl::error::ErrorStack::get())
    }
}

/// Whether the ClientHello being processed carries extension `kind`. Only meaningful inside a
/// client-hello callback (`SSL_CTX_set_client_hello_cb`); elsewhere it answers false.
pub(crate) fn client_hello_has_extension(ssl: &SslRef, kind: u32) -> bool {
    let mut data: *const u8 = std::ptr::null();
    let mut len: usize = 0;
    // SAFETY: the out-pointers are locals that outlive the call; OpenSSL only reads the
    // ClientHello it holds during the callback (and fails cleanly outside one).
    unsafe { openssl_sys::SSL_client_hello_get0_ext(ssl.as_ptr(), kind as c_uint, &mut data, &mut len) == 1 }
}

/// The OpenSSL name of the suite chosen for the handshake under way
/// (`SSL_get_pending_cipher`): a server has it once it has chosen, before it writes the
/// ServerHello's extensions, when `SSL_get_current_cipher` is still unset.
pub(crate) fn pending_cipher_name(ssl: &SslRef) -> Option<String> {
    // SAFETY: returns null or a pointer into OpenSSL's cipher table, which lives as long as
    // the library.
    let cipher = unsafe { SSL_get_pending_cipher(ssl.as_ptr()) };
    if cipher.is_null() {
        return None;
    }
    // SAFETY: `cipher` is a live table entry; its name is a static NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(openssl_sys::SSL_CIPHER_get_name(cipher)) };
    name.to_str().ok().map(str::to_string)
}
