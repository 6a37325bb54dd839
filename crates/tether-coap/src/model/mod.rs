//! Object models: what each resource of an object is called, its type, whether it is
//! readable, writable or executable, and whether it has instances. Built in ([`core`],
//! [`ipso`]): the core OMA objects 0–7 and the common IPSO objects, written from the
//! specifications; more are loaded from OMA DDF XML files ([`Models::load_ddf`]), as the
//! OMA registry publishes them. The server checks writes and executes against them before
//! anything goes to a device, and decodes values with their types and names.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::content::ResourceType;

pub mod core;
mod ddf;
pub mod ipso;

pub use ddf::DdfError;

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

/// The values a numeric resource takes, both ends included: from the LwM2M specification
/// for the built-in objects that give one (Lifetime is positive), from `<RangeEnumeration>`
/// (`min..max`) in DDF files.
#[derive(Debug, Clone, Copy)]
pub struct ValueRange {
    /// The least value.
    pub min: f64,
    /// The greatest value.
    pub max: f64,
}

impl ValueRange {
    /// Whether `value` is within.
    pub fn contains(&self, value: f64) -> bool {
        value >= self.min && value <= self.max
    }

    /// `"1 to 4294967295"`.
    pub fn describe(&self) -> String {
        format!("{} to {}", self.min, self.max)
    }

    /// `min..max` as DDF files write it; `None` for anything else (enumerations, lengths).
    pub fn parse(text: &str) -> Option<Self> {
        let (min, max) = text.trim().split_once("..")?;
        let (min, max) = (min.trim().parse::<f64>().ok()?, max.trim().parse::<f64>().ok()?);
        (min.is_finite() && max.is_finite() && min <= max).then_some(Self { min, max })
    }
}

impl PartialEq for ValueRange {
    fn eq(&self, other: &Self) -> bool {
        self.min.to_bits() == other.min.to_bits() && self.max.to_bits() == other.max.to_bits()
    }
}

impl Eq for ValueRange {}

/// One resource of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceModel {
    /// Resource ID.
    pub id: u16,
    /// Its name in the specification.
    pub name: Cow<'static, str>,
    /// Allowed operations.
    pub operations: Operations,
    /// Whether it has resource instances.
    pub multiple: bool,
    /// Value type (`None` for executable resources).
    pub kind: ResourceType,
    /// Units, if any.
    pub units: Cow<'static, str>,
    /// The values a numeric resource takes, where the specification or the DDF gives them.
    pub range: Option<ValueRange>,
}

impl ResourceModel {
    /// This resource, taking only values from `min` to `max`.
    pub const fn within(mut self, min: f64, max: f64) -> Self {
        self.range = Some(ValueRange { min, max });
        self
    }
}

/// One object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectModel {
    /// Object ID.
    pub id: u16,
    /// Its name.
    pub name: Cow<'static, str>,
    /// Whether it may have more than one instance.
    pub multiple: bool,
    /// Its resources, by ascending ID.
    pub resources: Cow<'static, [ResourceModel]>,
}

impl ObjectModel {
    /// The resource with this ID.
    pub fn resource(&self, id: u16) -> Option<&ResourceModel> {
        self.resources.binary_search_by_key(&id, |r| r.id).ok().map(|i| &self.resources[i])
    }
}

/// The built-in model of `object`, if tether has one.
pub fn object(object: u16) -> Option<&'static ObjectModel> {
    BUILT_IN.iter().copied().find(|o| o.id == object)
}

/// The built-in model of `/object/x/resource`, if tether has one.
pub fn resource(object: u16, resource: u16) -> Option<&'static ResourceModel> {
    self::object(object)?.resource(resource)
}

/// Every built-in object model.
pub const BUILT_IN: &[&ObjectModel] = &[
    &core::SECURITY,
    &core::SERVER,
    &core::ACCESS_CONTROL,
    &core::DEVICE,
    &core::CONNECTIVITY_MONITORING,
    &core::FIRMWARE_UPDATE,
    &core::LOCATION,
    &core::CONNECTIVITY_STATISTICS,
    &ipso::TEMPERATURE,
    &ipso::HUMIDITY,
    &ipso::ILLUMINANCE,
    &ipso::LIGHT_CONTROL,
    &ipso::ACCELEROMETER,
    &ipso::PRESSURE,
    &ipso::TIMER,
];

/// The models a server knows: the built-in ones and those loaded from DDF files, by
/// object ID (a loaded model replaces a built-in one of the same ID).
#[derive(Debug, Clone, Default)]
pub struct Models {
    loaded: BTreeMap<u16, ObjectModel>,
}

impl Models {
    /// The built-in models only.
    pub fn built_in() -> Self {
        Self::default()
    }

    /// Adds the objects of one DDF XML document; returns their IDs.
    pub fn load_ddf(&mut self, xml: &str) -> Result<Vec<u16>, DdfError> {
        let objects = ddf::parse(xml)?;
        let ids = objects.iter().map(|o| o.id).collect();
        for object in objects {
            self.loaded.insert(object.id, object);
        }
        Ok(ids)
    }

    /// How many objects are known, built in or loaded.
    pub fn len(&self) -> usize {
        BUILT_IN.iter().filter(|o| !self.loaded.contains_key(&o.id)).count() + self.loaded.len()
    }

    /// Whether no object is known (never: the built-in ones always are).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many objects were loaded from DDF files.
    pub fn loaded(&self) -> usize {
        self.loaded.len()
    }

    /// The model of `object`.
    pub fn object(&self, object: u16) -> Option<&ObjectModel> {
        self.loaded.get(&object).or_else(|| self::object(object))
    }

    /// The model of `/object/x/resource`.
    pub fn resource(&self, object: u16, resource: u16) -> Option<&ResourceModel> {
        self.object(object)?.resource(resource)
    }

    /// The type of `/object/x/resource`.
    pub fn resource_type(&self, object: u16, resource: u16) -> Option<ResourceType> {
        self.resource(object, resource).map(|r| r.kind)
    }
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

/// A built-in object: `object!(id, name, multiple, [resources…])`, its table in a const.
macro_rules! builtin_object {
    ($id:expr, $name:expr, $multiple:expr, $resources:expr $(,)?) => {{
        const RESOURCES: &[ResourceModel] = &$resources;
        o($id, $name, $multiple, RESOURCES)
    }};
}
use builtin_object;

/// A resource of a built-in table.
const fn r(
    id: u16,
    name: &'static str,
    operations: Operations,
    multiple: bool,
    kind: ResourceType,
    units: &'static str,
) -> ResourceModel {
    ResourceModel {
        id,
        name: Cow::Borrowed(name),
        operations,
        multiple,
        kind,
        units: Cow::Borrowed(units),
        range: None,
    }
}

/// An object of a built-in table.
const fn o(id: u16, name: &'static str, multiple: bool, resources: &'static [ResourceModel]) -> ObjectModel {
    ObjectModel { id, name: Cow::Borrowed(name), multiple, resources: Cow::Borrowed(resources) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OMA registry's DDF files, beside the project (never committed to it).
    fn registry() -> Option<std::path::PathBuf> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/lwm2m-models");
        dir.is_dir().then_some(dir)
    }

    #[test]
    fn built_in_models_agree_with_the_oma_registry_files() {
        let Some(dir) = registry() else {
            eprintln!("no OMA registry files beside the project: nothing to compare with");
            return;
        };
        let mut differences = Vec::new();
        for built_in in BUILT_IN {
            let xml = std::fs::read_to_string(dir.join(format!("{}.xml", built_in.id))).unwrap();
            let mut models = Models::built_in();
            assert_eq!(models.load_ddf(&xml).unwrap(), [built_in.id]);
            let registry = models.object(built_in.id).unwrap();
            if registry.multiple != built_in.multiple {
                differences.push(format!("/{}: multiple {}", built_in.id, registry.multiple));
            }
            for expected in registry.resources.iter() {
                let at = format!("/{}/x/{} {:?}", built_in.id, expected.id, expected.name);
                match built_in.resource(expected.id) {
                    None => differences.push(format!("{at}: missing")),
                    Some(ours) => {
                        let normal = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
                        if normal(&ours.name) != normal(&expected.name) {
                            differences.push(format!("{at}: named {:?}", ours.name));
                        }
                        if (ours.operations, ours.multiple, ours.kind)
                            != (expected.operations, expected.multiple, expected.kind)
                        {
                            differences.push(format!(
                                "{at}: {:?} {} {:?}, registry {:?} {} {:?}",
                                ours.operations,
                                ours.multiple,
                                ours.kind,
                                expected.operations,
                                expected.multiple,
                                expected.kind
                            ));
                        }
                    }
                }
            }
            for ours in built_in.resources.iter() {
                if registry.resource(ours.id).is_none() {
                    differences.push(format!("/{}/x/{} {:?}: not in the registry", built_in.id, ours.id, ours.name));
                }
            }
        }
        assert!(differences.is_empty(), "{}", differences.join("\n"));
    }

    #[test]
    fn every_registry_file_loads() {
        let Some(dir) = registry() else { return };
        let mut models = Models::built_in();
        let mut files = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "xml") {
                let xml = std::fs::read_to_string(&path).unwrap();
                models.load_ddf(&xml).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                files += 1;
            }
        }
        assert!(files > 100 && models.loaded() >= files, "{files} files, {} objects", models.loaded());
    }

    #[test]
    fn bad_ddf_is_named() {
        let mut models = Models::built_in();
        assert!(models.load_ddf("<LWM2M>").unwrap_err().to_string().contains("not XML"));
        assert!(models.load_ddf("<a/>").unwrap_err().to_string().contains("no <Object>"));
        let bad_type = "<LWM2M><Object><ObjectID>9</ObjectID><Resources><Item ID=\"1\"><Type>Quux</Type>\
                        </Item></Resources></Object></LWM2M>";
        assert!(models.load_ddf(bad_type).unwrap_err().to_string().contains("object 9: resource 1: unknown <Type>"));
        assert_eq!(models.loaded(), 0);
    }

    #[test]
    fn resources_are_sorted_so_lookups_find_every_one() {
        for object in BUILT_IN {
            for (i, resource) in object.resources.iter().enumerate() {
                assert_eq!(object.resource(resource.id), Some(resource), "/{}/x/{}", object.id, resource.id);
                assert_eq!(resource.kind == ResourceType::None, resource.operations == Operations::Execute);
                if i > 0 {
                    assert!(object.resources[i - 1].id < resource.id);
                }
            }
        }
        assert_eq!(resource(1, 1).map(|r| &*r.name), Some("Lifetime"));
        assert!(resource(3, 0).is_some_and(|r| !r.operations.writable()));
        assert!(resource(9, 0).is_none());
        let mut ids: Vec<u16> = BUILT_IN.iter().map(|o| o.id).collect();
        ids.dedup();
        assert_eq!(ids.len(), BUILT_IN.len());
    }
}
