//! OVA export: the `.ovf` descriptor first, the `.mf` manifest second (`SHA256(name)= hex`, the
//! form importers require), then one streamOptimized VMDK per disk, as a tar, with no temporary
//! file and memory bounded whatever the disks' size.
//!
//! The `.mf` must precede the disks it describes, and the `.ovf` their sizes; both are known
//! only once the disks are compressed. Two ways round that, by destination:
//!
//! - **A file** (one compression pass): the `.ovf` and `.mf` members' space is reserved first.
//!   The `.mf`'s length is known beforehand (one line per known member name, fixed-width hex
//!   digests); the `.ovf`'s is its rendering with every file size at its widest (20 digits).
//!   The VMDKs are then compressed once, in guest order, each written behind its tar header
//!   slot while being hashed; finally the `.ovf` (with the exact sizes, padded to its reserved
//!   length with spaces after the root element, which XML allows) and the `.mf` and all the
//!   tar headers are written into their places, the file synced and renamed into place.
//! - **A bucket** (two passes): every member's size and digest is taken in one pass that
//!   compresses each grain once (the VMDK layout pass hands its bytes in order to the hasher),
//!   then the archive is a function of the disks ([`OvaPlan`]), produced in parallel parts on
//!   demand (each grain compressed again) and uploaded; the same bytes again on a rerun, so an
//!   interrupted upload resumes.
//!
//! Each VMDK's header comes first, so its CID is not the stored grains' content id (known only
//! at the end) but a digest of what is known beforehand: member name, size and allocation map.

use super::{Hasher, ManifestAlg};
use crate::bundle::{Firmware, Role};
use crate::output::PendingOutput;
use crate::progress::Progress;
use diskkit_formats::image::{GuestRange, allocated_ranges};
use diskkit_formats::vmdk::stream::Emit;
use diskkit_formats::write::{CacheMode, CreateOptions};
use diskkit_formats::{Error, Image, ImageStream, Result};
use sha2::Digest;
use std::path::Path;

const BLOCK: u64 = 512;

/// A disk to export.
pub struct ExportDisk<'a> {
    pub image: &'a dyn Image,
    pub role: Role,
    pub device: String,
}

/// What the OVF says besides the disks.
#[derive(Debug, Clone, Default)]
pub struct MachineHints {
    pub firmware: Option<Firmware>,
    pub os: Option<String>,
}

/// An OVA to produce: machine `name` with `disks` in order.
pub struct Ova<'s, 'a> {
    pub name: &'s str,
    pub disks: &'s [ExportDisk<'a>],
    pub hints: &'s MachineHints,
    pub alg: ManifestAlg,
    /// Modification time of every member, seconds since 1970 (the bundle's creation time: the
    /// archive is a function of the bundle, so a rerun produces the same bytes).
    pub mtime: u64,
}

/// What was written: the archive's size and its members in order.
pub struct OvaSummary {
    pub size: u64,
    pub members: Vec<String>,
}

/// What is known of a disk before compressing it.
struct DiskFacts {
    member: String,
    /// Allocated bytes (the OVF's populatedSize).
    populated: u64,
    cid: u32,
}

enum Content {
    Bytes(Vec<u8>),
    /// The VMDK of disk N.
    Disk(usize),
}

/// A member: its header at `start`, its content after it, zeros to the next block.
struct Segment {
    start: u64,
    header: [u8; 512],
    len: u64,
    content: Content,
}

/// An OVA laid out: any byte range of it on demand.
pub struct OvaPlan<'a> {
    segments: Vec<Segment>,
    /// The VMDKs, at least one.
    disks: Vec<Box<dyn ImageStream + 'a>>,
    size: u64,
    /// The `.ovf` and `.mf` (which hold every member's size and digest) and the time: the same
    /// fingerprint is the same archive, so an interrupted upload resumes.
    fingerprint: String,
    /// Member names in order, for messages and tests.
    pub members: Vec<String>,
}

impl<'a> Ova<'_, 'a> {
    fn ovf_name(&self) -> String {
        format!("{}.ovf", self.name)
    }

    fn mf_name(&self) -> String {
        format!("{}.mf", self.name)
    }

    /// Member name, populated bytes and CID of each disk (a walk of the maps, no data read);
    /// at least one disk.
    fn facts(&self) -> Result<Vec<DiskFacts>> {
        if self.disks.is_empty() {
            return Err(Error::invalid("an OVA needs at least one disk"));
        }
        self.disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let member = format!("{}-disk{}.vmdk", self.name, i + 1);
                let whole = GuestRange::new(0, d.image.virtual_size());
                let mut id = sha2::Sha256::new();
                id.update(member.as_bytes());
                id.update(d.image.virtual_size().to_le_bytes());
                let mut populated = 0;
                for r in allocated_ranges(d.image, whole) {
                    let r = r?;
                    populated += r.len();
                    id.update(r.start.to_le_bytes());
                    id.update(r.end.to_le_bytes());
                }
                let id = id.finalize();
                Ok(DiskFacts {
                    member,
                    populated,
                    cid: u32::from_le_bytes([id[0], id[1], id[2], id[3]]),
                })
            })
            .collect()
    }

    /// Lays disk `i` out as a streamOptimized VMDK: compresses it once on the read pool,
    /// reporting guest bytes to `progress`, handing the file's bytes in order to `bytes`.
    fn lay_out(
        &self,
        i: usize,
        facts: &DiskFacts,
        progress: &dyn Progress,
        bytes: &mut (dyn FnMut(&[u8]) -> Result<()> + Send),
    ) -> Result<Box<dyn ImageStream + 'a>> {
        let image = self.disks[i].image;
        let mut opts = CreateOptions::default();
        opts.parse_options("subformat=streamOptimized,adapter_type=lsilogic")?;
        let mut allocated = allocated_ranges(image, GuestRange::new(0, image.virtual_size()));
        let emit = Emit {
            cid: facts.cid,
            bytes,
        };
        crate::parallel::read_pool()?.install(|| {
            diskkit_formats::vmdk::stream::stream_optimized(
                image,
                &facts.member,
                &mut opts,
                &mut allocated,
                &|n| progress.advance(n),
                Some(emit),
            )
        })
    }

    /// The `.ovf` descriptor with the VMDKs' `sizes`.
    fn descriptor(&self, facts: &[DiskFacts], sizes: &[u64]) -> String {
        descriptor(self.name, self.disks, facts, sizes, self.hints)
    }

    /// The `.mf` listing the `.ovf`'s digest, then each VMDK's (`digests`, in disk order).
    fn manifest(&self, ovf: &[u8], facts: &[DiskFacts], digests: &[String]) -> Vec<u8> {
        let alg = self.alg.name();
        let mut mf = format!(
            "{alg}({})= {}\n",
            self.ovf_name(),
            digest_bytes(ovf, self.alg)
        );
        for (f, digest) in facts.iter().zip(digests) {
            mf.push_str(&format!("{alg}({})= {digest}\n", f.member));
        }
        mf.into_bytes()
    }

    fn members(&self, facts: &[DiskFacts]) -> Vec<String> {
        let mut members = vec![self.ovf_name(), self.mf_name()];
        members.extend(facts.iter().map(|f| f.member.clone()));
        members
    }

    /// Plans the archive for a bucket: each disk compressed once to know its size and digest
    /// (`progress` counts guest bytes); the parts are produced on demand by [`OvaPlan`].
    pub fn plan(&self, progress: &dyn Progress) -> Result<OvaPlan<'a>> {
        let facts = self.facts()?;
        let mut streams = Vec::with_capacity(facts.len());
        let mut digests = Vec::with_capacity(facts.len());
        for (i, f) in facts.iter().enumerate() {
            let mut hasher = Hasher::new(self.alg);
            streams.push(self.lay_out(i, f, progress, &mut |b| {
                hasher.update(b);
                Ok(())
            })?);
            digests.push(hasher.finish());
        }
        let sizes: Vec<u64> = streams.iter().map(|s| s.size()).collect();
        let ovf = self.descriptor(&facts, &sizes).into_bytes();
        let mf = self.manifest(&ovf, &facts, &digests);
        let mut fingerprint = sha2::Sha256::new();
        fingerprint.update(self.mtime.to_le_bytes());
        fingerprint.update(&ovf);
        fingerprint.update(&mf);
        let members = self.members(&facts);
        let mut contents = vec![Content::Bytes(ovf), Content::Bytes(mf)];
        contents.extend((0..streams.len()).map(Content::Disk));
        let mut segments = Vec::with_capacity(contents.len());
        let mut at = 0;
        for (member, content) in members.iter().zip(contents) {
            let len = match &content {
                Content::Bytes(b) => b.len() as u64,
                Content::Disk(i) => streams[*i].size(),
            };
            segments.push(Segment {
                start: at,
                header: header(member, len, self.mtime)?,
                len,
                content,
            });
            at += BLOCK + len.next_multiple_of(BLOCK);
        }
        Ok(OvaPlan {
            segments,
            disks: streams,
            // Two zero blocks end the archive.
            size: at + 2 * BLOCK,
            fingerprint: format!(
                "ova-{}",
                diskkit_formats::digest::hex(&fingerprint.finalize())
            ),
            members,
        })
    }

    /// Writes the archive to the file `path` in one compression pass (see the module notes):
    /// a temporary file, synced and renamed into place. `progress` counts guest bytes.
    pub fn write_file(&self, path: &Path, progress: &dyn Progress) -> Result<OvaSummary> {
        use std::os::unix::fs::FileExt;
        let out = PendingOutput::new(path)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(out.temp_path())
            .map_err(|e| out.name_output(Error::io(out.temp_path(), "create", e)))?;
        let write_at = |bytes: &[u8], at: u64| {
            file.write_all_at(bytes, at)
                .map_err(|e| out.name_output(Error::io(out.temp_path(), "write", e)))
        };
        let facts = self.facts()?;
        let widest = vec![u64::MAX; facts.len()];
        let ovf_len = self.descriptor(&facts, &widest).len() as u64;
        let any_digest = vec![digest_bytes(b"", self.alg); facts.len()];
        let mf_len = self.manifest(b"", &facts, &any_digest).len() as u64;
        let mut at = 2 * BLOCK + ovf_len.next_multiple_of(BLOCK) + mf_len.next_multiple_of(BLOCK);
        let mut sizes = Vec::with_capacity(facts.len());
        let mut digests = Vec::with_capacity(facts.len());
        for (i, f) in facts.iter().enumerate() {
            let data = at + BLOCK;
            let mut end = data;
            let mut hasher = Hasher::new(self.alg);
            let size = self
                .lay_out(i, f, progress, &mut |b| {
                    write_at(b, end)?;
                    hasher.update(b);
                    end += b.len() as u64;
                    Ok(())
                })?
                .size();
            if end - data != size {
                return Err(Error::invalid(format!(
                    "OVA member {}: {} bytes written for a {size}-byte layout",
                    f.member,
                    end - data
                )));
            }
            write_at(&header(&f.member, size, self.mtime)?, at)?;
            sizes.push(size);
            digests.push(hasher.finish());
            at = data + size.next_multiple_of(BLOCK);
        }
        let mut ovf = self.descriptor(&facts, &sizes).into_bytes();
        let pad = (ovf_len as usize).checked_sub(ovf.len()).ok_or_else(|| {
            Error::invalid("OVA descriptor longer than the space reserved for it")
        })?;
        // Spaces after the root element, before the final newline.
        ovf.splice(ovf.len() - 1..ovf.len() - 1, std::iter::repeat_n(b' ', pad));
        let mf = self.manifest(&ovf, &facts, &digests);
        if mf.len() as u64 != mf_len {
            return Err(Error::invalid(
                "OVA manifest not of the length reserved for it",
            ));
        }
        let mf_at = BLOCK + ovf_len.next_multiple_of(BLOCK);
        write_at(&header(&self.ovf_name(), ovf_len, self.mtime)?, 0)?;
        write_at(&ovf, BLOCK)?;
        write_at(&header(&self.mf_name(), mf_len, self.mtime)?, mf_at)?;
        write_at(&mf, mf_at + BLOCK)?;
        // Member padding and the two zero blocks that end the archive.
        let size = at + 2 * BLOCK;
        file.set_len(size)
            .and_then(|()| file.sync_all())
            .map_err(|e| out.name_output(Error::io(out.temp_path(), "sync", e)))?;
        drop(file);
        out.commit(CacheMode::Writeback)?;
        Ok(OvaSummary {
            size,
            members: self.members(&facts),
        })
    }
}

/// A ustar header for a regular file, through the `tar` crate.
fn header(name: &str, len: u64, mtime: u64) -> Result<[u8; 512]> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)
        .map_err(|e| Error::invalid(format!("OVA member name '{name}': {e}")))?;
    h.set_size(len);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(*h.as_bytes())
}

fn digest_bytes(bytes: &[u8], alg: ManifestAlg) -> String {
    let mut h = Hasher::new(alg);
    h.update(bytes);
    h.finish()
}

/// Text escaped for XML, through quick-xml.
fn xml(text: &str) -> String {
    quick_xml::escape::escape(text).into_owned()
}

/// The OVF descriptor: References with exact sizes, a DiskSection (capacity = virtual size,
/// populatedSize = allocated bytes), one VirtualSystem with a SCSI controller (LSI Logic, as
/// the VMDKs' adapter type says) and one disk item per disk in order, the OS and the firmware.
fn descriptor(
    name: &str,
    disks: &[ExportDisk<'_>],
    facts: &[DiskFacts],
    sizes: &[u64],
    hints: &MachineHints,
) -> String {
    let mut refs = String::new();
    let mut section = String::new();
    let mut items = String::new();
    for (i, ((f, size), d)) in facts.iter().zip(sizes).zip(disks).enumerate() {
        refs += &format!(
            "    <File ovf:id=\"file{i}\" ovf:href=\"{}\" ovf:size=\"{size}\"/>\n",
            xml(&f.member),
        );
        section += &format!(
            "    <Disk ovf:diskId=\"vmdisk{i}\" ovf:fileRef=\"file{i}\" ovf:capacity=\"{}\" \
             ovf:capacityAllocationUnits=\"byte\" ovf:populatedSize=\"{}\" \
             ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n",
            d.image.virtual_size(),
            f.populated
        );
        items += &format!(
            "      <Item>\n        <rasd:AddressOnParent>{i}</rasd:AddressOnParent>\n        \
             <rasd:ElementName>{} ({})</rasd:ElementName>\n        \
             <rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource>\n        \
             <rasd:InstanceID>{}</rasd:InstanceID>\n        <rasd:Parent>3</rasd:Parent>\n        \
             <rasd:ResourceType>17</rasd:ResourceType>\n      </Item>\n",
            xml(&d.device),
            d.role.name(),
            10 + i
        );
    }
    let firmware = match hints.firmware {
        Some(Firmware::Uefi) => "efi",
        _ => "bios",
    };
    let os = xml(hints.os.as_deref().unwrap_or("Linux"));
    let name = xml(name);
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
{refs}  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
{section}  </DiskSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine exported by diskkit</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="101">
      <Info>The guest operating system</Info>
      <Description>{os}</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>1 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>1024 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
{items}      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="{firmware}"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// The archive as a stream push uploads in parts with its checkpoint (resumable): the object
/// is recorded as a container (`ova`) whose guest is the first (system) disk's, the one push
/// hashes for its manifest.
impl ImageStream for OvaPlan<'_> {
    fn format(&self) -> diskkit_formats::Format {
        diskkit_formats::Format::Vmdk
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn guest(&self) -> &dyn Image {
        self.disks[0].guest()
    }

    fn layout_fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn container(&self) -> Option<&'static str> {
        Some("ova")
    }

    /// Fills `buf` with the archive's bytes at `offset` (inside [`Self::size`]).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| Error::invalid("OVA read past its end"))?;
        buf.fill(0);
        for s in &self.segments {
            let data_start = s.start + BLOCK;
            let seg_end = data_start + s.len;
            if seg_end <= offset || s.start >= end {
                continue;
            }
            // The header.
            let (hs, he) = (s.start.max(offset), data_start.min(end));
            if hs < he {
                buf[(hs - offset) as usize..(he - offset) as usize]
                    .copy_from_slice(&s.header[(hs - s.start) as usize..(he - s.start) as usize]);
            }
            // The content (padding stays zero).
            let (cs, ce) = (data_start.max(offset), seg_end.min(end));
            if cs < ce {
                let out = &mut buf[(cs - offset) as usize..(ce - offset) as usize];
                let from = cs - data_start;
                match &s.content {
                    Content::Bytes(b) => {
                        out.copy_from_slice(&b[from as usize..(ce - data_start) as usize])
                    }
                    Content::Disk(i) => self.disks[*i].read_at(out, from)?,
                }
            }
        }
        Ok(())
    }
}
