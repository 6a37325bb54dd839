//! The core OMA objects 0–7, from OMA LwM2M 1.1 (Core, appendix E) and the objects'
//! specifications in the OMA registry.

use super::{builtin_object, o, r, ObjectModel, Operations, ResourceModel};
use crate::content::ResourceType;

use Operations::{Execute as E, None as NO, Read as R, ReadWrite as RW, Write as W};
use ResourceType::{
    Boolean as BOOL, Float as FLOAT, Integer as INT, None as EXEC, ObjectLink as LINK, Opaque as OPAQUE, String as STR,
    Time as TIME, Unsigned as UINT,
};

/// The longest registration lifetime, in seconds.
const LIFETIME_MAX: f64 = crate::registration::Lifetime::MAX.as_secs() as f64;
/// Seconds and counts a device keeps in 32 bits.
const U32_MAX: f64 = u32::MAX as f64;
/// Unix times from 1970 to the end of 9999.
pub const TIME_MAX: f64 = 253_402_300_799.0;

/// LwM2M Security, object 0 (version 1.2).
const SECURITY_RESOURCES: &[ResourceModel] = &[
    r(0, "LwM2M Server URI", NO, false, STR, ""),
    r(1, "Bootstrap-Server", NO, false, BOOL, ""),
    r(2, "Security Mode", NO, false, INT, ""),
    r(3, "Public Key or Identity", NO, false, OPAQUE, ""),
    r(4, "Server Public Key", NO, false, OPAQUE, ""),
    r(5, "Secret Key", NO, false, OPAQUE, ""),
    r(6, "SMS Security Mode", NO, false, INT, ""),
    r(7, "SMS Binding Key Parameters", NO, false, OPAQUE, ""),
    r(8, "SMS Binding Secret Key(s)", NO, false, OPAQUE, ""),
    r(9, "LwM2M Server SMS Number", NO, false, STR, ""),
    r(10, "Short Server ID", NO, false, INT, ""),
    r(11, "Client Hold Off Time", NO, false, INT, "s"),
    r(12, "Bootstrap-Server Account Timeout", NO, false, INT, "s"),
    r(13, "Matching Type", NO, false, UINT, ""),
    r(14, "SNI", NO, false, STR, ""),
    r(15, "Certificate Usage", NO, false, UINT, ""),
    r(16, "DTLS/TLS Ciphersuite", NO, true, UINT, ""),
    r(17, "OSCORE Security Mode", NO, false, LINK, ""),
    r(18, "Groups To Use by Client", NO, true, UINT, ""),
    r(19, "Signature Algorithms Supported by Server", NO, true, UINT, ""),
    r(20, "Signature Algorithms To Use by Client", NO, true, UINT, ""),
    r(21, "Signature Algorithm Certs Supported by Server", NO, true, UINT, ""),
    r(22, "TLS 1.3 Features To Use by Client", NO, false, UINT, ""),
    r(23, "TLS Extensions Supported by Server", NO, false, UINT, ""),
    r(24, "TLS Extensions To Use by Client", NO, false, UINT, ""),
    r(25, "Secondary LwM2M Server URI", NO, true, STR, ""),
    r(26, "MQTT Server", NO, false, LINK, ""),
    r(27, "LwM2M COSE Security", NO, true, LINK, ""),
    r(28, "RDS Destination Port", NO, false, INT, ""),
    r(29, "RDS Source Port", NO, false, INT, ""),
    r(30, "RDS Application ID", NO, false, STR, ""),
];

/// LwM2M Server, object 1 (version 1.2).
const SERVER_RESOURCES: &[ResourceModel] = &[
    r(0, "Short Server ID", R, false, INT, ""),
    // Positive (LwM2M 1.1 §6.2.1), and no longer than a registration may be.
    r(1, "Lifetime", RW, false, INT, "s").within(1.0, LIFETIME_MAX),
    r(2, "Default Minimum Period", RW, false, INT, "s").within(0.0, U32_MAX),
    r(3, "Default Maximum Period", RW, false, INT, "s").within(0.0, U32_MAX),
    r(4, "Disable", E, false, EXEC, ""),
    r(5, "Disable Timeout", RW, false, INT, "s").within(0.0, U32_MAX),
    r(6, "Notification Storing When Disabled or Offline", RW, false, BOOL, ""),
    r(7, "Binding", RW, false, STR, ""),
    r(8, "Registration Update Trigger", E, false, EXEC, ""),
    r(9, "Bootstrap-Request Trigger", E, false, EXEC, ""),
    r(10, "APN Link", RW, false, LINK, ""),
    r(11, "TLS-DTLS Alert Code", R, false, UINT, ""),
    r(12, "Last Bootstrapped", R, false, TIME, ""),
    r(13, "Registration Priority Order", R, false, UINT, ""),
    r(14, "Initial Registration Delay Timer", RW, false, UINT, "s"),
    r(15, "Registration Failure Block", R, false, BOOL, ""),
    r(16, "Bootstrap on Registration Failure", R, false, BOOL, ""),
    r(17, "Communication Retry Count", RW, false, UINT, "").within(1.0, U32_MAX),
    r(18, "Communication Retry Timer", RW, false, UINT, "s").within(0.0, U32_MAX),
    r(19, "Communication Sequence Delay Timer", RW, false, UINT, "s").within(0.0, U32_MAX),
    r(20, "Communication Sequence Retry Count", RW, false, UINT, "").within(1.0, U32_MAX),
    r(21, "Trigger", RW, false, BOOL, ""),
    r(22, "Preferred Transport", RW, false, STR, ""),
    r(23, "Mute Send", RW, false, BOOL, ""),
    r(24, "Alternate APN Links", RW, true, LINK, ""),
    r(25, "Supported Server Versions", RW, true, STR, ""),
    r(26, "Default Notification Mode", RW, false, INT, ""),
    r(27, "Profile ID Hash Algorithm", RW, false, UINT, ""),
];

/// Device, object 3 (version 1.1).
const DEVICE_RESOURCES: &[ResourceModel] = &[
    r(0, "Manufacturer", R, false, STR, ""),
    r(1, "Model Number", R, false, STR, ""),
    r(2, "Serial Number", R, false, STR, ""),
    r(3, "Firmware Version", R, false, STR, ""),
    r(4, "Reboot", E, false, EXEC, ""),
    r(5, "Factory Reset", E, false, EXEC, ""),
    r(6, "Available Power Sources", R, true, INT, ""),
    r(7, "Power Source Voltage", R, true, INT, "mV"),
    r(8, "Power Source Current", R, true, INT, "mA"),
    r(9, "Battery Level", R, false, INT, "%").within(0.0, 100.0),
    r(10, "Memory Free", R, false, INT, "KiB"),
    r(11, "Error Code", R, true, INT, ""),
    r(12, "Reset Error Code", E, false, EXEC, ""),
    r(13, "Current Time", RW, false, TIME, "").within(0.0, TIME_MAX),
    r(14, "UTC Offset", RW, false, STR, ""),
    r(15, "Timezone", RW, false, STR, ""),
    r(16, "Supported Binding and Modes", R, false, STR, ""),
    r(17, "Device Type", R, false, STR, ""),
    r(18, "Hardware Version", R, false, STR, ""),
    r(19, "Software Version", R, false, STR, ""),
    r(20, "Battery Status", R, false, INT, ""),
    r(21, "Memory Total", R, false, INT, "KiB"),
    r(22, "ExtDevInfo", R, true, LINK, ""),
];

/// LwM2M Security, object 0.
pub const SECURITY: ObjectModel = o(0, "LwM2M Security", true, SECURITY_RESOURCES);
/// LwM2M Server, object 1.
pub const SERVER: ObjectModel = o(1, "LwM2M Server", true, SERVER_RESOURCES);
/// Device, object 3.
pub const DEVICE: ObjectModel = o(3, "Device", false, DEVICE_RESOURCES);

/// LwM2M Access Control, object 2.
pub const ACCESS_CONTROL: ObjectModel = builtin_object!(
    2,
    "LwM2M Access Control",
    true,
    [
        r(0, "Object ID", R, false, INT, ""),
        r(1, "Object Instance ID", R, false, INT, ""),
        r(2, "ACL", RW, true, INT, ""),
        r(3, "Access Control Owner", RW, false, INT, ""),
    ],
);

/// Connectivity Monitoring, object 4.
pub const CONNECTIVITY_MONITORING: ObjectModel = builtin_object!(
    4,
    "Connectivity Monitoring",
    false,
    [
        r(0, "Network Bearer", R, false, INT, ""),
        r(1, "Available Network Bearer", R, true, INT, ""),
        r(2, "Radio Signal Strength", R, false, INT, "dBm"),
        r(3, "Link Quality", R, false, INT, ""),
        r(4, "IP Addresses", R, true, STR, ""),
        r(5, "Router IP Addresses", R, true, STR, ""),
        r(6, "Link Utilization", R, false, INT, "%"),
        r(7, "APN", R, true, STR, ""),
        r(8, "Cell ID", R, false, INT, ""),
        r(9, "SMNC", R, false, INT, ""),
        r(10, "SMCC", R, false, INT, ""),
        r(11, "SignalSNR", R, false, INT, "dB"),
        r(12, "LAC", R, false, INT, ""),
        r(13, "Coverage Enhancement Level", R, false, INT, ""),
    ],
);

/// Firmware Update, object 5.
pub const FIRMWARE_UPDATE: ObjectModel = builtin_object!(
    5,
    "Firmware Update",
    false,
    [
        r(0, "Package", W, false, OPAQUE, ""),
        r(1, "Package URI", RW, false, STR, ""),
        r(2, "Update", E, false, EXEC, ""),
        r(3, "State", R, false, INT, ""),
        r(5, "Update Result", R, false, INT, ""),
        r(6, "PkgName", R, false, STR, ""),
        r(7, "PkgVersion", R, false, STR, ""),
        r(8, "Firmware Update Protocol Support", R, true, INT, ""),
        r(9, "Firmware Update Delivery Method", R, false, INT, ""),
        r(10, "Cancel", E, false, EXEC, ""),
        r(11, "Severity", RW, false, INT, ""),
        r(12, "Last State Change Time", R, false, TIME, ""),
        r(13, "Maximum Defer Period", RW, false, UINT, "s"),
        r(14, "Automatic Upgrade at Download", RW, false, BOOL, ""),
    ],
);

/// Location, object 6.
pub const LOCATION: ObjectModel = builtin_object!(
    6,
    "Location",
    false,
    [
        r(0, "Latitude", R, false, FLOAT, "lat"),
        r(1, "Longitude", R, false, FLOAT, "lon"),
        r(2, "Altitude", R, false, FLOAT, "m"),
        r(3, "Radius", R, false, FLOAT, "m"),
        r(4, "Velocity", R, false, OPAQUE, ""),
        r(5, "Timestamp", R, false, TIME, ""),
        r(6, "Speed", R, false, FLOAT, "m/s"),
    ],
);

/// Connectivity Statistics, object 7.
pub const CONNECTIVITY_STATISTICS: ObjectModel = builtin_object!(
    7,
    "Connectivity Statistics",
    false,
    [
        r(0, "SMS Tx Counter", R, false, INT, ""),
        r(1, "SMS Rx Counter", R, false, INT, ""),
        r(2, "Tx Data", R, false, INT, "KiB"),
        r(3, "Rx Data", R, false, INT, "KiB"),
        r(4, "Max Message Size", R, false, INT, "B"),
        r(5, "Average Message Size", R, false, INT, "B"),
        r(6, "Start", E, false, EXEC, ""),
        r(7, "Stop", E, false, EXEC, ""),
        r(8, "Collection Period", RW, false, INT, "s"),
    ],
);
