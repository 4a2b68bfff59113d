//! OVF descriptors (DMTF DSP0243), read and written through quick-xml. Reading takes what an
//! import needs (the files, the disks in the machine's order, firmware and OS hints) and
//! refuses a DTD (no entity is ever declared or expanded), undeclared entities, absurd counts
//! and capacities.

use crate::bundle::{Firmware, MAX_DISKS};
use diskkit_formats::{Error, Result};
use quick_xml::events::Event;
use std::collections::BTreeMap;
use std::path::Path;

/// Bytes an OVF descriptor may have.
pub const MAX_OVF: u64 = 16 << 20;
/// The largest disk capacity taken (1 PiB; clouds stop far below).
pub const MAX_CAPACITY: u64 = 1 << 50;
const MAX_FILES: usize = 1024;
const MAX_DEPTH: usize = 64;
/// Characters of text kept from one element.
const MAX_TEXT: usize = 64 << 10;

/// A file the descriptor references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfFile {
    pub id: String,
    pub href: String,
    pub size: Option<u64>,
}

/// A virtual disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    pub id: String,
    /// The `href` of its file.
    pub href: String,
    pub capacity: u64,
    pub populated_size: Option<u64>,
}

/// What an import takes from a descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub name: Option<String>,
    pub os: Option<String>,
    pub firmware: Option<Firmware>,
    pub files: Vec<OvfFile>,
    /// In the machine's order: the disk items of the hardware section (boot disk first), then
    /// any disk no item names.
    pub disks: Vec<OvfDisk>,
}

/// A `Disk` of the DiskSection as written.
#[derive(Clone)]
struct DiskEntry {
    id: String,
    file_ref: String,
    capacity: String,
    units: Option<String>,
    populated: Option<String>,
}

/// The fields of a hardware item being read.
#[derive(Default)]
struct Item {
    fields: BTreeMap<String, String>,
}

/// Parses the descriptor `text` read from `name`.
pub fn parse(name: &Path, text: &str) -> Result<Descriptor> {
    let corrupt = |at: u64, reason: String| Error::corrupt(name, "OVF descriptor", at, reason);
    if text.len() as u64 > MAX_OVF {
        return Err(corrupt(
            0,
            format!("{} bytes, more than {MAX_OVF}", text.len()),
        ));
    }
    let mut reader = quick_xml::Reader::from_str(text);
    let mut stack: Vec<String> = Vec::new();
    let mut d = Descriptor::default();
    let mut disks: Vec<DiskEntry> = Vec::new();
    let mut item: Option<Item> = None;
    let mut items: Vec<Item> = Vec::new();
    let mut text_buf = String::new();
    let mut os_type: Option<String> = None;
    loop {
        let at = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|e| corrupt(at, format!("not well-formed XML: {e}")))?;
        let (start, empty) = match &event {
            Event::Start(e) => (Some(e.clone()), false),
            Event::Empty(e) => (Some(e.clone()), true),
            _ => (None, false),
        };
        if let Some(e) = start {
            let local = e.local_name().as_ref().to_string();
            let mut attrs = BTreeMap::new();
            for a in e.attributes() {
                let a = a.map_err(|err| corrupt(at, format!("bad attribute: {err}")))?;
                let key = a.key.local_name().as_ref().to_string();
                let value = a
                    .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                    .map_err(|err| corrupt(at, format!("attribute {key}: {err}")))?;
                attrs.insert(key, value.into_owned());
            }
            let parent = stack.last().map(String::as_str);
            match (parent, local.as_str()) {
                (Some("References"), "File") => {
                    if d.files.len() >= MAX_FILES {
                        return Err(corrupt(at, format!("more than {MAX_FILES} files")));
                    }
                    let size = attrs
                        .get("size")
                        .map(|s| number(s).ok_or_else(|| corrupt(at, format!("file size '{s}'"))))
                        .transpose()?;
                    d.files.push(OvfFile {
                        id: attrs.get("id").cloned().unwrap_or_default(),
                        href: attrs.get("href").cloned().unwrap_or_default(),
                        size,
                    });
                }
                (Some("DiskSection"), "Disk") => {
                    if disks.len() >= MAX_DISKS {
                        return Err(corrupt(at, format!("more than {MAX_DISKS} disks")));
                    }
                    disks.push(DiskEntry {
                        id: attrs.get("diskId").cloned().unwrap_or_default(),
                        file_ref: attrs.get("fileRef").cloned().unwrap_or_default(),
                        capacity: attrs.get("capacity").cloned().unwrap_or_default(),
                        units: attrs.get("capacityAllocationUnits").cloned(),
                        populated: attrs.get("populatedSize").cloned(),
                    });
                }
                (_, "VirtualSystem") if d.name.is_none() => d.name = attrs.get("id").cloned(),
                (_, "OperatingSystemSection") => os_type = attrs.get("osType").cloned(),
                (Some("VirtualHardwareSection"), "Item" | "StorageItem") => {
                    item = Some(Item::default());
                }
                (Some("VirtualHardwareSection"), "Config")
                    if attrs.get("key").map(String::as_str) == Some("firmware") =>
                {
                    d.firmware = match attrs.get("value").map(String::as_str) {
                        Some("efi") => Some(Firmware::Uefi),
                        Some("bios") => Some(Firmware::Bios),
                        _ => d.firmware,
                    };
                }
                _ => {}
            }
            if !empty {
                if stack.len() >= MAX_DEPTH {
                    return Err(corrupt(
                        at,
                        format!("elements nested deeper than {MAX_DEPTH}"),
                    ));
                }
                stack.push(local);
                text_buf.clear();
            }
            continue;
        }
        match event {
            Event::DocType(_) => {
                return Err(corrupt(
                    at,
                    "a DOCTYPE: entity declarations are refused, never expanded".into(),
                ));
            }
            Event::GeneralRef(r) => {
                let name = r.clone().into_inner();
                let c = match name.as_ref() {
                    "amp" => '&',
                    "lt" => '<',
                    "gt" => '>',
                    "quot" => '"',
                    "apos" => '\'',
                    _ => r
                        .resolve_char_ref()
                        .ok()
                        .flatten()
                        .ok_or_else(|| corrupt(at, format!("undeclared entity &{name};")))?,
                };
                if text_buf.len() < MAX_TEXT {
                    text_buf.push(c);
                }
            }
            Event::Text(t) => {
                let t = t.xml10_content();
                let room = MAX_TEXT.saturating_sub(text_buf.len());
                text_buf.push_str(&t[..t.floor_char_boundary(room.min(t.len()))]);
            }
            Event::End(_) => {
                let Some(local) = stack.pop() else {
                    return Err(corrupt(at, "an end tag without a start".into()));
                };
                let parent = stack.last().map(String::as_str);
                let value = text_buf.trim().to_string();
                text_buf.clear();
                match (parent, local.as_str()) {
                    (Some("OperatingSystemSection"), "Description") if !value.is_empty() => {
                        d.os = Some(value);
                    }
                    (Some("Item" | "StorageItem"), field) => {
                        if let Some(i) = item.as_mut() {
                            i.fields.insert(field.to_string(), value);
                        }
                    }
                    (Some("VirtualHardwareSection"), "Item" | "StorageItem") => {
                        if let Some(i) = item.take() {
                            items.push(i);
                        }
                    }
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if d.os.is_none() {
        d.os = os_type;
    }
    for f in &d.files {
        check_href(name, &f.href)?;
    }
    // Disk items (resource type 17) in order name the machine's disks: `ovf:/disk/ID`.
    let mut order: Vec<String> = items
        .iter()
        .filter(|i| i.fields.get("ResourceType").map(String::as_str) == Some("17"))
        .filter_map(|i| i.fields.get("HostResource"))
        .filter_map(|r| r.rsplit('/').next().map(str::to_string))
        .collect();
    for e in &disks {
        if !order.contains(&e.id) {
            order.push(e.id.clone());
        }
    }
    for id in order {
        let Some(DiskEntry {
            id,
            file_ref,
            capacity,
            units,
            populated,
        }) = disks.iter().find(|e| e.id == id).cloned()
        else {
            continue;
        };
        let file = d.files.iter().find(|f| f.id == file_ref).ok_or_else(|| {
            corrupt(
                0,
                format!("disk {id} names file '{file_ref}', which References lacks"),
            )
        })?;
        let capacity = capacity_bytes(&capacity, units.as_deref())
            .ok_or_else(|| corrupt(0, format!("disk {id}: capacity '{capacity}' {units:?}")))?;
        if capacity > MAX_CAPACITY {
            return Err(corrupt(
                0,
                format!("disk {id}: capacity {capacity} is absurd (over {MAX_CAPACITY})"),
            ));
        }
        d.disks.push(OvfDisk {
            id,
            href: file.href.clone(),
            capacity,
            populated_size: populated.as_deref().and_then(number),
        });
    }
    Ok(d)
}

fn number(s: &str) -> Option<u64> {
    s.trim().parse().ok()
}

/// Bytes of a capacity in `units` (`byte`, `byte * 2^N`; bytes when absent).
fn capacity_bytes(capacity: &str, units: Option<&str>) -> Option<u64> {
    let n = number(capacity)?;
    let shift = match units.map(|u| u.replace(' ', "")) {
        None => 0,
        Some(u) if u == "byte" => 0,
        Some(u) => u.strip_prefix("byte*2^")?.parse::<u32>().ok()?,
    };
    if shift > 60 {
        return None;
    }
    n.checked_mul(1u64 << shift)
}

/// A reference may only name a file beside the descriptor (or a member of its archive).
pub fn check_href(name: &Path, href: &str) -> Result<()> {
    let bad = href.is_empty()
        || href.contains(['/', '\\', '\0'])
        || href == "."
        || href == ".."
        || href.contains("://");
    if bad {
        return Err(Error::corrupt(
            name,
            "OVF descriptor",
            0,
            format!("file reference '{href}': only plain file names beside the descriptor"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:id="file1" ovf:href="sys.vmdk" ovf:size="1234"/>
    <File ovf:id="file2" ovf:href="data.vmdk"/>
  </References>
  <DiskSection><Info>Disks</Info>
    <Disk ovf:diskId="d2" ovf:fileRef="file2" ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^20"/>
    <Disk ovf:diskId="d1" ovf:fileRef="file1" ovf:capacity="25165824" ovf:populatedSize="1000"/>
  </DiskSection>
  <VirtualSystem ovf:id="web &amp; db">
    <OperatingSystemSection ovf:id="96" vmw:osType="debian12_64Guest"><Info/><Description>Debian &#49;3</Description></OperatingSystemSection>
    <VirtualHardwareSection>
      <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:HostResource>ovf:/disk/d1</rasd:HostResource><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:HostResource>ovf:/disk/d2</rasd:HostResource><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#;

    #[test]
    fn descriptors_parse_in_machine_order() {
        let d = parse(Path::new("x.ovf"), OVF).unwrap();
        assert_eq!(d.name.as_deref(), Some("web & db"));
        assert_eq!(d.os.as_deref(), Some("Debian 13"));
        assert_eq!(d.firmware, Some(Firmware::Uefi));
        assert_eq!(d.disks.len(), 2);
        assert_eq!(d.disks[0].href, "sys.vmdk");
        assert_eq!(d.disks[0].capacity, 24 << 20);
        assert_eq!(d.disks[0].populated_size, Some(1000));
        assert_eq!(d.disks[1].capacity, 16 << 20);
        assert_eq!(d.files[0].size, Some(1234));
    }

    #[test]
    fn hostile_descriptors_are_refused() {
        let name = Path::new("x.ovf");
        let dtd = format!(
            "<?xml version=\"1.0\"?><!DOCTYPE e [<!ENTITY a \"aaaa\"><!ENTITY b \"&a;&a;\">]>{}",
            &OVF[OVF.find("<Envelope").unwrap()..]
        );
        assert!(
            parse(name, &dtd)
                .unwrap_err()
                .to_string()
                .contains("DOCTYPE")
        );
        let external = OVF.replace("Debian &#49;3", "&xxe;");
        assert!(
            parse(name, &external)
                .unwrap_err()
                .to_string()
                .contains("undeclared entity")
        );
        let escape = OVF.replace("sys.vmdk", "../../etc/shadow");
        assert!(
            parse(name, &escape)
                .unwrap_err()
                .to_string()
                .contains("plain file names")
        );
        let huge = OVF.replace("25165824", "99999999999999999999");
        assert!(parse(name, &huge).is_err());
        let absurd = OVF.replace("byte * 2^20", "byte * 2^50");
        assert!(
            parse(name, &absurd)
                .unwrap_err()
                .to_string()
                .contains("absurd")
        );
        let missing = OVF.replace("ovf:fileRef=\"file2\"", "ovf:fileRef=\"file9\"");
        assert!(
            parse(name, &missing)
                .unwrap_err()
                .to_string()
                .contains("file9")
        );
        let deep = format!("<a>{}</a>", "<b>".repeat(100));
        assert!(parse(name, &deep).is_err());
    }
}
