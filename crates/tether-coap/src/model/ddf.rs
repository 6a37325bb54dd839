//! OMA DDF XML (the LwM2M object definition format of the OMA registry, `LWM2M.xsd`): the
//! parts a server needs — object ID, name, multiplicity, and each resource's ID, name,
//! operations, multiplicity, type and units. Parsed with `roxmltree` (a small, safe,
//! read-only XML parser; DDF files are a few kilobytes).

use std::borrow::Cow;

use super::{ObjectModel, Operations, ResourceModel};
use crate::content::ResourceType;

/// A DDF document that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DdfError(String);

/// Largest DDF document read (the biggest in the OMA registry is under 100 KB).
const MAX_LEN: usize = 1024 * 1024;

/// The objects of a DDF document.
pub(super) fn parse(xml: &str) -> Result<Vec<ObjectModel>, DdfError> {
    if xml.len() > MAX_LEN {
        return Err(DdfError(format!("larger than {MAX_LEN} bytes")));
    }
    let document = roxmltree::Document::parse(xml).map_err(|e| DdfError(format!("not XML: {e}")))?;
    let objects: Vec<ObjectModel> =
        document.descendants().filter(|n| n.has_tag_name("Object")).map(object).collect::<Result<_, _>>()?;
    if objects.is_empty() {
        return Err(DdfError("no <Object> element: not an LwM2M DDF file".into()));
    }
    Ok(objects)
}

fn child<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.children().find(|c| c.has_tag_name(name)).map(|c| c.text().unwrap_or("").trim())
}

fn object(node: roxmltree::Node<'_, '_>) -> Result<ObjectModel, DdfError> {
    let id = child(node, "ObjectID").ok_or_else(|| DdfError("an <Object> without <ObjectID>".into()))?;
    let id: u16 = id.parse().map_err(|_| DdfError(format!("<ObjectID> {id:?} is not an object ID")))?;
    let name = child(node, "Name").unwrap_or_default().to_string();
    let multiple = child(node, "MultipleInstances") == Some("Multiple");
    let mut resources = Vec::new();
    if let Some(list) = node.children().find(|c| c.has_tag_name("Resources")) {
        for item in list.children().filter(|c| c.has_tag_name("Item")) {
            resources.push(resource(item).map_err(|e| DdfError(format!("object {id}: {e}")))?);
        }
    }
    resources.sort_by_key(|r| r.id);
    if let Some(pair) = resources.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(DdfError(format!("object {id}: resource {} is defined twice", pair[0].id)));
    }
    Ok(ObjectModel { id, name: Cow::Owned(name), multiple, resources: Cow::Owned(resources) })
}

fn resource(item: roxmltree::Node<'_, '_>) -> Result<ResourceModel, DdfError> {
    let id = item.attribute("ID").ok_or_else(|| DdfError("an <Item> without an ID".into()))?;
    let id: u16 = id.trim().parse().map_err(|_| DdfError(format!("<Item ID={id:?}> is not a resource ID")))?;
    let operations = match child(item, "Operations").unwrap_or_default() {
        "" => Operations::None,
        "R" => Operations::Read,
        "W" => Operations::Write,
        "RW" => Operations::ReadWrite,
        "E" => Operations::Execute,
        other => return Err(DdfError(format!("resource {id}: unknown <Operations> {other:?}"))),
    };
    let kind = match child(item, "Type").unwrap_or_default() {
        "String" => ResourceType::String,
        "Integer" => ResourceType::Integer,
        "Unsigned Integer" => ResourceType::Unsigned,
        "Float" => ResourceType::Float,
        "Boolean" => ResourceType::Boolean,
        "Opaque" => ResourceType::Opaque,
        "Time" => ResourceType::Time,
        "Objlnk" => ResourceType::ObjectLink,
        // Executable resources have no type; "Corelnk" values are link-format text.
        "" | "none" => ResourceType::None,
        "Corelnk" => ResourceType::String,
        other => return Err(DdfError(format!("resource {id}: unknown <Type> {other:?}"))),
    };
    let kind = if operations == Operations::Execute { ResourceType::None } else { kind };
    Ok(ResourceModel {
        id,
        name: Cow::Owned(child(item, "Name").unwrap_or_default().to_string()),
        operations,
        multiple: child(item, "MultipleInstances") == Some("Multiple"),
        kind,
        units: Cow::Owned(child(item, "Units").unwrap_or_default().to_string()),
        range: match kind {
            ResourceType::Integer | ResourceType::Unsigned | ResourceType::Float | ResourceType::Time => {
                child(item, "RangeEnumeration").and_then(super::ValueRange::parse)
            }
            _ => None,
        },
    })
}
