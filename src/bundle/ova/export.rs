//! OVA export: the `.ovf` descriptor first, the `.mf` manifest second (`SHA256(name)= hex`, the
//! form importers require), then one streamOptimized VMDK per disk, as a tar whose every byte
//! is a function of the disks: every member's size (and the VMDKs' digests, which the `.mf`
//! needs before them) is computed first, then the archive is produced in parallel pieces, in
//! one pass, into a file (temporary name, synced, renamed) or a bucket, with no temporary file.

use super::{Hasher, ManifestAlg};
use crate::bundle::{Firmware, Role};
use crate::output::PendingOutput;
use crate::progress::Progress;
use diskkit_formats::image::{GuestRange, allocated_ranges};
use diskkit_formats::write::{CacheMode, CreateOptions};
use diskkit_formats::{Error, Image, ImageStream, Result};
use rayon::prelude::*;
use std::path::Path;

const BLOCK: u64 = 512;
/// Bytes of the archive produced per parallel job.
const PIECE: u64 = 4 << 20;

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

enum Content<'a> {
    Bytes(Vec<u8>),
    Stream(Box<dyn ImageStream + 'a>),
}

/// A member: its header at `start`, its content after it, zeros to the next block.
struct Segment<'a> {
    start: u64,
    header: [u8; 512],
    len: u64,
    content: Content<'a>,
}

/// An OVA laid out: any byte range of it on demand.
pub struct OvaPlan<'a> {
    segments: Vec<Segment<'a>>,
    size: u64,
    /// Member names in order, for messages and tests.
    pub members: Vec<String>,
}

/// Plans the OVA of machine `name` with `disks` in order: lays each disk out as a
/// streamOptimized VMDK (compressing it once to know its size), hashes each VMDK for the `.mf`
/// (producing it once more), writes the OVF and the `.mf`. `progress` counts guest bytes of
/// both passes.
pub fn plan<'a>(
    name: &str,
    disks: &[ExportDisk<'a>],
    hints: &MachineHints,
    alg: ManifestAlg,
    progress: &dyn Progress,
) -> Result<OvaPlan<'a>> {
    let mut streams = Vec::with_capacity(disks.len());
    let mut populated = Vec::with_capacity(disks.len());
    for (i, d) in disks.iter().enumerate() {
        let member = format!("{name}-disk{}.vmdk", i + 1);
        let mut opts = CreateOptions::default();
        opts.parse_options("subformat=streamOptimized,adapter_type=lsilogic")?;
        let whole = GuestRange::new(0, d.image.virtual_size());
        let mut data = 0;
        for r in allocated_ranges(d.image, whole) {
            data += r?.len();
        }
        populated.push(data);
        let mut allocated = allocated_ranges(d.image, whole);
        let stream = diskkit_formats::vmdk::stream::stream_optimized(
            d.image,
            &member,
            &mut opts,
            &mut allocated,
            &|n| progress.advance(n),
        )?;
        streams.push((member, stream));
    }
    let mut digests = Vec::with_capacity(streams.len());
    for (_, s) in &streams {
        digests.push(digest_stream(s.as_ref(), alg)?);
    }
    let ovf_name = format!("{name}.ovf");
    let ovf = descriptor(name, disks, &streams, &populated, hints)?.into_bytes();
    let mut mf = format!("{}({ovf_name})= {}\n", alg.name(), digest_bytes(&ovf, alg));
    for ((member, _), digest) in streams.iter().zip(&digests) {
        mf.push_str(&format!("{}({member})= {digest}\n", alg.name()));
    }
    let mut members = vec![ovf_name.clone(), format!("{name}.mf")];
    let mut contents = vec![
        (ovf_name, Content::Bytes(ovf)),
        (format!("{name}.mf"), Content::Bytes(mf.into_bytes())),
    ];
    for (member, stream) in streams {
        members.push(member.clone());
        contents.push((member, Content::Stream(stream)));
    }
    let mut segments = Vec::with_capacity(contents.len());
    let mut at = 0;
    for (member, content) in contents {
        let len = match &content {
            Content::Bytes(b) => b.len() as u64,
            Content::Stream(s) => s.size(),
        };
        segments.push(Segment {
            start: at,
            header: header(&member, len)?,
            len,
            content,
        });
        at += BLOCK + len.next_multiple_of(BLOCK);
    }
    // Two zero blocks end the archive.
    let size = at + 2 * BLOCK;
    Ok(OvaPlan {
        segments,
        size,
        members,
    })
}

/// A ustar header for a regular file, through the `tar` crate.
fn header(name: &str, len: u64) -> Result<[u8; 512]> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)
        .map_err(|e| Error::invalid(format!("OVA member name '{name}': {e}")))?;
    h.set_size(len);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(*h.as_bytes())
}

fn digest_bytes(bytes: &[u8], alg: ManifestAlg) -> String {
    let mut h = Hasher::new(alg);
    h.update(bytes);
    h.finish()
}

/// The digest of a whole stream, produced in parallel pieces and hashed in order.
fn digest_stream(stream: &dyn ImageStream, alg: ManifestAlg) -> Result<String> {
    let mut hasher = Hasher::new(alg);
    let size = stream.size();
    let pool = crate::parallel::read_pool()?;
    let window = PIECE * 2 * pool.current_num_threads() as u64;
    let mut at = 0;
    while at < size {
        let end = (at + window).min(size);
        let pieces: Vec<Vec<u8>> = pool.install(|| {
            (at..end)
                .step_by(PIECE as usize)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|p| {
                    let mut buf = vec![0; PIECE.min(end - p) as usize];
                    stream.read_at(&mut buf, p)?;
                    Ok(buf)
                })
                .collect::<Result<_>>()
        })?;
        for p in &pieces {
            hasher.update(p);
        }
        at = end;
    }
    Ok(hasher.finish())
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
    streams: &[(String, Box<dyn ImageStream + '_>)],
    populated: &[u64],
    hints: &MachineHints,
) -> Result<String> {
    let mut refs = String::new();
    let mut section = String::new();
    let mut items = String::new();
    for (i, ((member, stream), d)) in streams.iter().zip(disks).enumerate() {
        refs += &format!(
            "    <File ovf:id=\"file{i}\" ovf:href=\"{}\" ovf:size=\"{}\"/>\n",
            xml(member),
            stream.size()
        );
        section += &format!(
            "    <Disk ovf:diskId=\"vmdisk{i}\" ovf:fileRef=\"file{i}\" ovf:capacity=\"{}\" \
             ovf:capacityAllocationUnits=\"byte\" ovf:populatedSize=\"{}\" \
             ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n",
            d.image.virtual_size(),
            populated[i]
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
    Ok(format!(
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
    ))
}

impl OvaPlan<'_> {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fills `buf` with the archive's bytes at `offset` (inside [`Self::size`]).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
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
                    Content::Stream(st) => st.read_at(out, from)?,
                }
            }
        }
        Ok(())
    }

    /// Writes the archive to `path`: pieces produced in parallel, written at their offsets
    /// into a temporary file that is synced and renamed into place.
    pub fn write_file(&self, path: &Path, progress: &dyn Progress) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let out = PendingOutput::new(path)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(out.temp_path())
            .map_err(|e| out.name_output(Error::io(out.temp_path(), "create", e)))?;
        let pool = crate::parallel::read_pool()?;
        let pieces: Vec<u64> = (0..self.size).step_by(PIECE as usize).collect();
        pool.install(|| {
            pieces.par_iter().try_for_each(|&at| {
                let mut buf = vec![0; PIECE.min(self.size - at) as usize];
                self.read_at(&mut buf, at)?;
                file.write_all_at(&buf, at)
                    .map_err(|e| out.name_output(Error::io(out.temp_path(), "write", e)))?;
                progress.advance(buf.len() as u64);
                Ok::<_, Error>(())
            })
        })?;
        file.sync_all()
            .map_err(|e| out.name_output(Error::io(out.temp_path(), "sync", e)))?;
        drop(file);
        out.commit(CacheMode::Writeback).map(drop)
    }

    /// Uploads the archive to `key` of `store` in parts produced on demand.
    pub fn upload(
        &self,
        store: &dyn crate::storage::Store,
        key: &str,
        progress: &dyn Progress,
    ) -> Result<()> {
        let part = crate::storage::push::part_size(self.size, None)?;
        store.upload_stream(
            key,
            self.size,
            part,
            crate::storage::push::DEFAULT_PARALLEL,
            &mut |offset, buf| {
                let len = part.min(self.size - offset);
                buf.resize(len as usize, 0);
                self.read_at(buf, offset)?;
                progress.advance(len);
                Ok(())
            },
        )
    }
}
