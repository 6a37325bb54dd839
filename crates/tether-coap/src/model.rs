//! Object models: what each resource of an object is called, its type, whether it is
//! readable, writable or executable, and whether it has instances — written from the OMA
//! LwM2M 1.1 specification (Core, appendix E) for the Security (0), Server (1) and Device
//! (3) objects. The server checks writes and executes against them before anything goes to
//! a device, and decodes values with their types.

use crate::content::ResourceType;

/// What can be done with a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operations {
    /// Not accessible over the Device Management interface (Security object resources,
    /// which only the bootstrap server writes).
    None,
    /// Read.
    Read,
    /// Write.
    Write,
    /// Read and write.
    ReadWrite,
    /// Execute.
    Execute,
}

impl Operations {
    /// Whether a Read is allowed.
    pub fn readable(self) -> bool {
        matches!(self, Self::Read | Self::ReadWrite)
    }

    /// Whether a Write is allowed.
    pub fn writable(self) -> bool {
        matches!(self, Self::Write | Self::ReadWrite)
    }

    /// Whether an Execute is allowed.
    pub fn executable(self) -> bool {
        self == Self::Execute
    }

    /// `R`, `W`, `RW`, `E` or empty, as OMA's registry writes them.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "",
            Self::Read => "R",
            Self::Write => "W",
            Self::ReadWrite => "RW",
            Self::Execute => "E",
        }
    }
}

/// One resource of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceModel {
    /// Resource ID.
    pub id: u16,
    /// Its name in the specification.
    pub name: &'static str,
    /// Allowed operations.
    pub operations: Operations,
    /// Whether it has resource instances.
    pub multiple: bool,
    /// Value type (`None` for executable resources).
    pub kind: ResourceType,
    /// Units, if any.
    pub units: &'static str,
}

/// One object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectModel {
    /// Object ID.
    pub id: u16,
    /// Its name.
    pub name: &'static str,
    /// Whether it may have more than one instance.
    pub multiple: bool,
    /// Its resources, by ascending ID.
    pub resources: &'static [ResourceModel],
}

impl ObjectModel {
    /// The resource with this ID.
    pub fn resource(&self, id: u16) -> Option<&'static ResourceModel> {
        self.resources.binary_search_by_key(&id, |r| r.id).ok().map(|i| &self.resources[i])
    }
}

/// The model of `object`, if tether knows it.
pub fn object(object: u16) -> Option<&'static ObjectModel> {
    CORE.iter().find(|o| o.id == object)
}

/// The model of `/object/x/resource`, if tether knows it.
pub fn resource(object: u16, resource: u16) -> Option<&'static ResourceModel> {
    self::object(object)?.resource(resource)
}

/// The name of a type as the specification writes it.
pub fn type_name(kind: ResourceType) -> &'static str {
    match kind {
        ResourceType::String => "String",
        ResourceType::Integer => "Integer",
        ResourceType::Unsigned => "Unsigned Integer",
        ResourceType::Float => "Float",
        ResourceType::Boolean => "Boolean",
        ResourceType::Opaque => "Opaque",
        ResourceType::Time => "Time",
        ResourceType::ObjectLink => "Objlnk",
        ResourceType::None => "none (executable)",
    }
}

const fn r(
    id: u16,
    name: &'static str,
    operations: Operations,
    multiple: bool,
    kind: ResourceType,
    units: &'static str,
) -> ResourceModel {
    ResourceModel { id, name, operations, multiple, kind, units }
}

use Operations::{Execute as E, None as NO, Read as R, ReadWrite as RW};
use ResourceType::{
    Boolean as BOOL, Integer as INT, None as EXEC, ObjectLink as LINK, Opaque as OPAQUE, String as STR, Time as TIME,
    Unsigned as UINT,
};

/// LwM2M Security, object 0 (version 1.1).
const SECURITY: &[ResourceModel] = &[
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
];

/// LwM2M Server, object 1 (version 1.1).
const SERVER: &[ResourceModel] = &[
    r(0, "Short Server ID", R, false, INT, ""),
    r(1, "Lifetime", RW, false, INT, "s"),
    r(2, "Default Minimum Period", RW, false, INT, "s"),
    r(3, "Default Maximum Period", RW, false, INT, "s"),
    r(4, "Disable", E, false, EXEC, ""),
    r(5, "Disable Timeout", RW, false, INT, "s"),
    r(6, "Notification Storing When Disabled or Offline", RW, false, BOOL, ""),
    r(7, "Binding", RW, false, STR, ""),
    r(8, "Registration Update Trigger", E, false, EXEC, ""),
    r(9, "Bootstrap-Request Trigger", E, false, EXEC, ""),
    r(10, "APN Link", RW, false, LINK, ""),
    r(11, "TLS-DTLS Alert Code", R, false, UINT, ""),
    r(12, "Last Bootstrapped", R, false, TIME, ""),
    r(13, "Registration Priority Order", RW, false, UINT, ""),
    r(14, "Initial Registration Delay Timer", RW, false, UINT, "s"),
    r(15, "Registration Failure Block", RW, false, BOOL, ""),
    r(16, "Bootstrap on Registration Failure", RW, false, BOOL, ""),
    r(17, "Communication Retry Count", RW, false, UINT, ""),
    r(18, "Communication Retry Timer", RW, false, UINT, "s"),
    r(19, "Communication Sequence Delay Timer", RW, false, UINT, "s"),
    r(20, "Communication Sequence Retry Count", RW, false, UINT, ""),
    r(21, "Trigger", RW, false, BOOL, ""),
    r(22, "Preferred Transport", RW, false, STR, ""),
    r(23, "Mute Send", RW, false, BOOL, ""),
];

/// Device, object 3 (version 1.1).
const DEVICE: &[ResourceModel] = &[
    r(0, "Manufacturer", R, false, STR, ""),
    r(1, "Model Number", R, false, STR, ""),
    r(2, "Serial Number", R, false, STR, ""),
    r(3, "Firmware Version", R, false, STR, ""),
    r(4, "Reboot", E, false, EXEC, ""),
    r(5, "Factory Reset", E, false, EXEC, ""),
    r(6, "Available Power Sources", R, true, INT, ""),
    r(7, "Power Source Voltage", R, true, INT, "mV"),
    r(8, "Power Source Current", R, true, INT, "mA"),
    r(9, "Battery Level", R, false, INT, "%"),
    r(10, "Memory Free", R, false, INT, "KiB"),
    r(11, "Error Code", R, true, INT, ""),
    r(12, "Reset Error Code", E, false, EXEC, ""),
    r(13, "Current Time", RW, false, TIME, ""),
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

const CORE: &[ObjectModel] = &[
    ObjectModel { id: 0, name: "LwM2M Security", multiple: true, resources: SECURITY },
    ObjectModel { id: 1, name: "LwM2M Server", multiple: true, resources: SERVER },
    ObjectModel { id: 3, name: "Device", multiple: false, resources: DEVICE },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_sorted_so_lookups_find_every_one() {
        for object in CORE {
            for (i, resource) in object.resources.iter().enumerate() {
                assert_eq!(object.resource(resource.id), Some(resource), "/{}/x/{}", object.id, resource.id);
                assert_eq!(resource.kind == ResourceType::None, resource.operations == E);
                if i > 0 {
                    assert!(object.resources[i - 1].id < resource.id);
                }
            }
        }
        assert_eq!(resource(1, 1).map(|r| r.name), Some("Lifetime"));
        assert!(resource(3, 0).is_some_and(|r| !r.operations.writable()));
        assert!(resource(4, 0).is_none());
    }
}
