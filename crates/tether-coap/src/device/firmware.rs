//! The Firmware Update object (5) of a simulated device, as OMA LwM2M 1.1 §E.6 defines it:
//! a package pushed to /5/0/0 (block-wise), checked, installed by Execute /5/0/2 across a
//! reboot, with State (/5/0/3) and Update Result (/5/0/5) following each step.
//!
//! The device accepts packages in a format of its own, as real devices accept only their
//! vendor's: a header line `tether-firmware <name> <version> sha256=<hex of the image>`, then
//! the image. Anything else is an unsupported package type (Result 6); an image whose hash
//! differs is an integrity failure (Result 5). Build one by hand:
//!
//! ```text
//! { printf 'tether-firmware demo 2.0.0 sha256=%s\n' "$(sha256sum image.bin | cut -d' ' -f1)"; cat image.bin; } > fw.pkg
//! ```
//!
//! Only push delivery: /5/0/9 says so, and a Package URI is answered with Result 9
//! (unsupported protocol).

use coap_lite::ResponseType;
use sha2::{Digest, Sha256};

/// /5/0/3 State.
pub mod state {
    /// Nothing to install.
    pub const IDLE: i64 = 0;
    /// A package is arriving.
    pub const DOWNLOADING: i64 = 1;
    /// A checked package waits for Update.
    pub const DOWNLOADED: i64 = 2;
    /// Installing (the device reboots into the new firmware).
    pub const UPDATING: i64 = 3;
}

/// /5/0/5 Update Result.
pub mod result {
    /// Nothing happened yet (or the object was reset).
    pub const INITIAL: i64 = 0;
    /// The firmware was updated.
    pub const SUCCESS: i64 = 1;
    /// The image does not match the hash in the package.
    pub const INTEGRITY_CHECK_FAILURE: i64 = 5;
    /// Not a package this device takes.
    pub const UNSUPPORTED_PACKAGE_TYPE: i64 = 6;
    /// Pull over the given URI's protocol is not supported.
    pub const UNSUPPORTED_PROTOCOL: i64 = 9;
    /// The download or update was cancelled (/5/0/10).
    pub const CANCELLED: i64 = 10;
}

/// /5/0/9 Firmware Update Delivery Method: 1, push only.
pub const DELIVERY_PUSH_ONLY: i64 = 1;

/// The largest package the device takes (its "flash").
pub const MAX_PACKAGE: usize = 1024 * 1024;

/// A checked package's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Package {
    name: String,
    version: String,
}

/// The Firmware Update object's state.
#[derive(Debug, Clone, Default)]
pub struct Firmware {
    /// The version running once an update installed one (else the factory version).
    installed: Option<String>,
    /// The last package received: waiting for Update while `downloaded`.
    package: Option<Package>,
    downloaded: bool,
    downloading: bool,
    /// Update was executed: the package is installed at the next boot.
    updating: bool,
    result: i64,
    uri: String,
}

impl Firmware {
    /// /5/0/3.
    pub fn state(&self) -> i64 {
        if self.updating {
            state::UPDATING
        } else if self.downloaded {
            state::DOWNLOADED
        } else if self.downloading {
            state::DOWNLOADING
        } else {
            state::IDLE
        }
    }

    /// /5/0/5.
    pub fn result(&self) -> i64 {
        self.result
    }

    /// /5/0/1.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// /5/0/6 and /5/0/7: the last package's name and version (empty before any).
    pub fn package(&self) -> (&str, &str) {
        self.package.as_ref().map_or(("", ""), |p| (p.name.as_str(), p.version.as_str()))
    }

    /// The version an update installed, if any.
    pub fn installed(&self) -> Option<&str> {
        self.installed.as_deref()
    }

    /// Blocks of a package are arriving (or stopped arriving).
    pub fn set_downloading(&mut self, downloading: bool) {
        self.downloading = downloading && !self.updating;
    }

    /// Whether a Write of /5/0/0 or /5/0/1 is allowed now (not while updating).
    pub fn writable(&self) -> bool {
        !self.updating
    }

    /// A Write of /5/0/0: an empty package resets the object; another is checked and, if it
    /// is good, waits for Update.
    pub fn write_package(&mut self, bytes: &[u8]) {
        self.downloading = false;
        self.downloaded = false;
        if bytes.is_empty() {
            self.result = result::INITIAL;
            return;
        }
        match check(bytes) {
            Ok(package) => {
                self.package = Some(package);
                self.downloaded = true;
                self.result = result::INITIAL;
            }
            Err(code) => self.result = code,
        }
    }

    /// A Write of /5/0/1: empty resets the object; a URI asks for a pull, which this
    /// device does not do.
    pub fn write_uri(&mut self, uri: &str) {
        self.uri = uri.to_string();
        self.downloading = false;
        self.downloaded = false;
        self.result = if uri.is_empty() { result::INITIAL } else { result::UNSUPPORTED_PROTOCOL };
    }

    /// Execute /5/0/2: install the downloaded package (at the reboot that follows).
    pub fn update(&mut self) -> Result<(), ResponseType> {
        if !self.downloaded {
            return Err(ResponseType::MethodNotAllowed);
        }
        self.downloaded = false;
        self.updating = true;
        Ok(())
    }

    /// Execute /5/0/10: drop a package being received or waiting (not one being installed).
    pub fn cancel(&mut self) -> Result<(), ResponseType> {
        if self.updating || !(self.downloaded || self.downloading) {
            return Err(ResponseType::MethodNotAllowed);
        }
        self.downloaded = false;
        self.downloading = false;
        self.result = result::CANCELLED;
        Ok(())
    }

    /// The device boots: an update in progress is installed.
    pub fn boot(&mut self) {
        self.downloading = false;
        if std::mem::take(&mut self.updating) {
            self.installed = self.package.as_ref().map(|p| p.version.clone());
            self.result = result::SUCCESS;
        }
    }
}

/// The package's name and version, or the Update Result that says why it is refused.
fn check(bytes: &[u8]) -> Result<Package, i64> {
    let unsupported = Err(result::UNSUPPORTED_PACKAGE_TYPE);
    let Some(newline) = bytes.iter().take(512).position(|b| *b == b'\n') else { return unsupported };
    let Ok(header) = std::str::from_utf8(&bytes[..newline]) else { return unsupported };
    let image = &bytes[newline + 1..];
    let fields: Vec<&str> = header.split(' ').collect();
    let ["tether-firmware", name, version, hash] = fields[..] else { return unsupported };
    let Some(expected) = hash.strip_prefix("sha256=") else { return unsupported };
    if name.is_empty() || version.is_empty() {
        return unsupported;
    }
    let actual: String = Sha256::digest(image).iter().map(|b| format!("{b:02x}")).collect();
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(result::INTEGRITY_CHECK_FAILURE);
    }
    Ok(Package { name: name.to_string(), version: version.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A package of this device's format around `image`.
    pub fn package(version: &str, image: &[u8]) -> Vec<u8> {
        let hash: String = Sha256::digest(image).iter().map(|b| format!("{b:02x}")).collect();
        let mut bytes = format!("tether-firmware demo {version} sha256={hash}\n").into_bytes();
        bytes.extend_from_slice(image);
        bytes
    }

    #[test]
    fn a_good_package_is_installed_by_update_and_a_reboot() {
        let mut firmware = Firmware::default();
        assert_eq!((firmware.state(), firmware.result()), (state::IDLE, result::INITIAL));
        assert_eq!(firmware.update(), Err(ResponseType::MethodNotAllowed));
        firmware.set_downloading(true);
        assert_eq!(firmware.state(), state::DOWNLOADING);
        firmware.write_package(&package("2.0.0", &[0xAB; 3000]));
        assert_eq!(firmware.state(), state::DOWNLOADED);
        assert_eq!(firmware.package(), ("demo", "2.0.0"));
        firmware.update().unwrap();
        assert_eq!(firmware.state(), state::UPDATING);
        assert!(!firmware.writable());
        firmware.boot();
        assert_eq!((firmware.state(), firmware.result()), (state::IDLE, result::SUCCESS));
        assert_eq!(firmware.installed(), Some("2.0.0"));
    }

    #[test]
    fn bad_packages_say_why_and_empty_writes_reset() {
        let mut firmware = Firmware::default();
        let mut corrupted = package("2.0.0", &[1; 100]);
        *corrupted.last_mut().unwrap() ^= 1;
        firmware.write_package(&corrupted);
        assert_eq!((firmware.state(), firmware.result()), (state::IDLE, result::INTEGRITY_CHECK_FAILURE));
        firmware.write_package(b"MZ\x90\x00 not a package");
        assert_eq!(firmware.result(), result::UNSUPPORTED_PACKAGE_TYPE);
        firmware.write_package(b"tether-firmware demo sha256=00\nx");
        assert_eq!(firmware.result(), result::UNSUPPORTED_PACKAGE_TYPE);
        firmware.write_package(b"");
        assert_eq!((firmware.state(), firmware.result()), (state::IDLE, result::INITIAL));
        firmware.write_uri("coaps://example.invalid/fw");
        assert_eq!(firmware.result(), result::UNSUPPORTED_PROTOCOL);
        firmware.write_package(&package("3", b"image"));
        firmware.cancel().unwrap();
        assert_eq!((firmware.state(), firmware.result()), (state::IDLE, result::CANCELLED));
        assert_eq!(firmware.update(), Err(ResponseType::MethodNotAllowed));
    }
}
