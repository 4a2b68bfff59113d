//! The job file: one item per line, as CSV with a header line or as JSON Lines. Every field is
//! checked before anything runs; errors name the file, the line and the field.

use crate::targets::{self, Cloud, Output};
use diskkit_formats::write::CreateOptions;
use diskkit_formats::{Error, Format, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Largest job file read: ~1 million items of a few hundred bytes.
pub const MAX_JOB_FILE: u64 = 256 << 20;
/// Longest line (or CSV record) of a job file.
pub const MAX_LINE: usize = 64 << 10;
/// Most items in one job file.
pub const MAX_ITEMS: usize = 1_000_000;
/// Errors listed before the rest are only counted.
const MAX_LISTED_ERRORS: usize = 20;

/// The field names a job file may use.
pub const FIELDS: [&str; 6] = [
    "source",
    "destination",
    "operation",
    "format",
    "options",
    "target",
];

/// What an item does; `convert` when the job file does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// A local image into a new local image (`diskkit convert`).
    Convert,
    /// A local image into an object (`diskkit push`).
    Push,
    /// An object into a local image (`diskkit pull`).
    Pull,
    /// A local image into a snapshot store (`diskkit snapshot create`).
    Snapshot,
    /// A machine's disks into a bundle of a snapshot store (`diskkit bundle create`): the
    /// source is the system disk, `options` the data disks ([`BundleDisks`]), the destination
    /// `STORE#NAME`.
    Bundle,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::Convert => "convert",
            Operation::Push => "push",
            Operation::Pull => "pull",
            Operation::Snapshot => "snapshot",
            Operation::Bundle => "bundle",
        }
    }

    fn parse(s: &str) -> std::result::Result<Operation, String> {
        match s {
            "" | "convert" => Ok(Operation::Convert),
            "push" => Ok(Operation::Push),
            "pull" => Ok(Operation::Pull),
            "snapshot" => Ok(Operation::Snapshot),
            "bundle" => Ok(Operation::Bundle),
            other => Err(format!(
                "unknown operation '{other}' (convert, push, pull, snapshot or bundle)"
            )),
        }
    }

    /// True when the source is a local file (else an object URL).
    pub fn local_source(self) -> bool {
        self != Operation::Pull
    }

    /// True when the destination is a local file (else an object or store URL).
    pub fn local_destination(self) -> bool {
        matches!(self, Operation::Convert | Operation::Pull)
    }
}

/// One checked line of a job file. Local paths are absolute (relative ones are taken from the
/// job file's directory, so every worker finds the same files whatever its working directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Line number in the job file (from 1).
    pub line: usize,
    pub source: String,
    pub destination: String,
    pub operation: Operation,
    /// Output format (`-O`); `None`: the command's default.
    pub format: Option<Format>,
    /// Output options as `-o` takes them; empty for none.
    pub options: String,
    /// A cloud profile of the target table, as `--target` of convert and push.
    pub target: Option<Cloud>,
}

impl Item {
    /// What this item writes (`-O`, `-o`, `--target`), with `default` when it names no format:
    /// an image and its create options, or GCE's tarball (`target` gce).
    pub fn output(&self, default: Format) -> Result<(Output, CreateOptions)> {
        let mut create = CreateOptions::default();
        if !self.options.is_empty() {
            create.parse_options(&self.options)?;
        }
        let Some(cloud) = self.target else {
            let format = self.format.unwrap_or(default);
            return Ok((
                Output::Image {
                    format,
                    options: &[],
                },
                create,
            ));
        };
        let resolved = targets::resolve(cloud, self.format, &mut create);
        if !resolved.broken.is_empty() {
            return Err(targets::refusal(cloud, &resolved.broken));
        }
        Ok((resolved.output, create))
    }

    /// [`Item::output`] of an item that writes an image (pull: no target).
    pub fn image_output(&self, default: Format) -> Result<(Format, CreateOptions)> {
        match self.output(default)? {
            (Output::Image { format, .. }, create) => Ok((format, create)),
            (Output::GceTarball, _) => Err(Error::invalid(format!(
                "line {}: {} writes an image, not GCE's tarball",
                self.line,
                self.operation.name()
            ))),
        }
    }

    /// The fields that define the item, as written in a job file: its identity in the job.
    pub fn canonical(&self) -> String {
        serde_json::json!([
            self.source,
            self.destination,
            self.operation.name(),
            self.format.map(|f| f.name()),
            self.options,
            self.target.map(Cloud::name),
        ])
        .to_string()
    }
}

/// The fields of one line as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem {
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    format: String,
    #[serde(default)]
    options: String,
    #[serde(default)]
    target: String,
}

/// A parsed and checked job file.
#[derive(Debug)]
pub struct JobFile {
    pub path: PathBuf,
    pub items: Vec<Item>,
}

/// Errors found in a job file, each naming its line and field.
struct Problems {
    file: String,
    list: Vec<String>,
    count: usize,
}

impl Problems {
    fn add(&mut self, line: usize, what: impl std::fmt::Display) {
        self.count += 1;
        if self.list.len() < MAX_LISTED_ERRORS {
            self.list
                .push(format!("{}: line {line}: {what}", self.file));
        }
    }

    fn into_result(self) -> Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let mut text = self.list.join("\n");
        if self.count > self.list.len() {
            text.push_str(&format!(
                "\n... and {} more errors",
                self.count - self.list.len()
            ));
        }
        Err(Error::invalid(text))
    }
}

impl JobFile {
    /// Reads and checks the job file at `path`.
    pub fn read(path: &Path) -> Result<JobFile> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "stat", e))?;
        if meta.len() > MAX_JOB_FILE {
            return Err(Error::invalid(format!(
                "{}: {} bytes: job files are limited to {MAX_JOB_FILE} bytes (split the job)",
                path.display(),
                meta.len()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, "read", e))?;
        let base = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let items = parse(&path.display().to_string(), &bytes, &base)?;
        Ok(JobFile {
            path: path.to_path_buf(),
            items,
        })
    }
}

/// Parses a job file's bytes (`name` for messages); relative local paths are taken from `base`.
/// JSON Lines when the first non-blank byte is `{`, else CSV with a header line.
pub fn parse(name: &str, bytes: &[u8], base: &Path) -> Result<Vec<Item>> {
    let mut problems = Problems {
        file: name.to_string(),
        list: Vec::new(),
        count: 0,
    };
    let raw = if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        parse_json_lines(bytes, &mut problems)
    } else {
        parse_csv(bytes, &mut problems)
    };
    if raw.len() > MAX_ITEMS {
        return Err(Error::invalid(format!(
            "{name}: {} items: a job file holds at most {MAX_ITEMS} (split the job)",
            raw.len()
        )));
    }
    let mut items = Vec::with_capacity(raw.len());
    let mut destinations: HashMap<String, usize> = HashMap::new();
    for (line, r) in raw {
        let Some(item) = check_item(line, r, base, &mut problems) else {
            continue;
        };
        match destinations.get(&item.destination) {
            Some(first) => problems.add(
                line,
                format!(
                    "field destination: same as line {first} ({})",
                    item.destination
                ),
            ),
            None => {
                destinations.insert(item.destination.clone(), line);
            }
        }
        items.push(item);
    }
    if items.is_empty() && problems.count == 0 {
        problems.add(1, "no items");
    }
    problems.into_result()?;
    Ok(items)
}

fn parse_json_lines(bytes: &[u8], problems: &mut Problems) -> Vec<(usize, RawItem)> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        if line.len() > MAX_LINE {
            problems.add(line_no, format!("longer than {MAX_LINE} bytes"));
            continue;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<RawItem>(line) {
            Ok(r) => out.push((line_no, r)),
            Err(e) => problems.add(line_no, e),
        }
        if out.len() > MAX_ITEMS {
            break;
        }
    }
    out
}

fn parse_csv(bytes: &[u8], problems: &mut Problems) -> Vec<(usize, RawItem)> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    // The line a record starts on (the reader's own line count skips blank lines, and its
    // positions point at the blank lines before a record).
    let line_at = |byte: u64| {
        let mut start = (byte as usize).min(bytes.len());
        while start < bytes.len() && matches!(bytes[start], b'\n' | b'\r') {
            start += 1;
        }
        bytes[..start].iter().filter(|&&b| b == b'\n').count() + 1
    };
    let mut records = reader.byte_records();
    let mut columns: Vec<usize> = Vec::new();
    let mut out = Vec::new();
    match records.next() {
        Some(Ok(header)) => {
            for (i, name) in header.iter().enumerate() {
                let name = String::from_utf8_lossy(name);
                match FIELDS.iter().position(|f| *f == name.trim()) {
                    Some(_) if columns.iter().any(|&c| FIELDS[c] == name.trim()) => {
                        problems.add(1, format!("column {}: field {name} twice", i + 1))
                    }
                    Some(f) => columns.push(f),
                    None => problems.add(
                        1,
                        format!(
                            "column {}: unknown field '{name}' (fields: {}; the first line is \
                             the header)",
                            i + 1,
                            FIELDS.join(", ")
                        ),
                    ),
                }
            }
            if problems.count > 0 {
                return out;
            }
        }
        Some(Err(e)) => {
            problems.add(1, e);
            return out;
        }
        None => return out,
    }
    for record in records {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| line_at(p.byte()));
                problems.add(line, e);
                // A broken quote swallows the rest of the file: one error is enough.
                break;
            }
        };
        let line = record.position().map_or(0, |p| line_at(p.byte()));
        if record.as_slice().len() > MAX_LINE {
            problems.add(line, format!("longer than {MAX_LINE} bytes"));
            continue;
        }
        if record.iter().all(|f| f.iter().all(u8::is_ascii_whitespace)) {
            continue;
        }
        if record.len() != columns.len() {
            problems.add(
                line,
                format!(
                    "{} fields where the header has {}",
                    record.len(),
                    columns.len()
                ),
            );
            continue;
        }
        let mut raw = RawItem::default();
        let mut bad = false;
        for (value, &column) in record.iter().zip(&columns) {
            let Ok(value) = std::str::from_utf8(value) else {
                problems.add(line, format!("field {}: not UTF-8", FIELDS[column]));
                bad = true;
                continue;
            };
            let value = value.trim().to_string();
            match column {
                0 => raw.source = value,
                1 => raw.destination = value,
                2 => raw.operation = value,
                3 => raw.format = value,
                4 => raw.options = value,
                _ => raw.target = value,
            }
        }
        if !bad {
            out.push((line, raw));
        }
        if out.len() > MAX_ITEMS {
            break;
        }
    }
    out
}

/// A URL (`s3://`, `oss://`, `obs://`, `file://`) rather than a local path.
fn is_url(s: &str) -> bool {
    s.contains("://")
}

/// `s` as an absolute local path, relative ones taken from `base`; a URL is kept as it is.
fn absolute(s: &str, base: &Path) -> String {
    if is_url(s) {
        return s.to_string();
    }
    let p = Path::new(s);
    if p.is_absolute() {
        s.to_string()
    } else {
        base.join(p).to_string_lossy().into_owned()
    }
}

fn check_item(line: usize, r: RawItem, base: &Path, problems: &mut Problems) -> Option<Item> {
    let before = problems.count;
    let operation = Operation::parse(r.operation.trim())
        .map_err(|e| problems.add(line, format!("field operation: {e}")))
        .ok();
    for (field, value) in [("source", &r.source), ("destination", &r.destination)] {
        if value.is_empty() {
            problems.add(line, format!("field {field}: missing"));
        } else if value.chars().any(char::is_control) {
            problems.add(line, format!("field {field}: control characters"));
        }
    }
    let format = match r.format.as_str() {
        "" => None,
        f => Format::parse(f)
            .map_err(|e| problems.add(line, format!("field format: {e}")))
            .ok(),
    };
    let bundle = operation == Some(Operation::Bundle);
    if !bundle
        && !r.options.is_empty()
        && let Err(e) = CreateOptions::default().parse_options(&r.options)
    {
        problems.add(line, format!("field options: {e}"));
    }
    let target = match r.target.as_str() {
        "" => None,
        name => targets::parse(name)
            .map_err(|e| problems.add(line, format!("field target: {e}")))
            .ok(),
    };
    let operation = operation?;
    if problems.count > before {
        return None;
    }
    let local = [
        ("source", &r.source, operation.local_source()),
        ("destination", &r.destination, operation.local_destination()),
    ];
    for (field, value, must_be_local) in local {
        if must_be_local && is_url(value) && !value.starts_with("file://") {
            problems.add(
                line,
                format!(
                    "field {field}: {} takes a local path here, not a URL",
                    operation.name()
                ),
            );
        }
        if must_be_local && value.ends_with('/') {
            problems.add(
                line,
                format!("field {field}: names a directory, not a file"),
            );
        }
    }
    if operation == Operation::Push && r.destination.ends_with('/') {
        problems.add(
            line,
            "field destination: name the object, not a prefix ending in /",
        );
    }
    match operation {
        Operation::Snapshot if format.is_some() || !r.options.is_empty() || target.is_some() => {
            problems.add(line, "snapshot takes no format, options or target")
        }
        Operation::Pull if target.is_some() => problems.add(line, "field target: pull has none"),
        Operation::Bundle if format.is_some() || target.is_some() => {
            problems.add(line, "bundle takes no format or target")
        }
        _ => {}
    }
    let mut options = r.options;
    if operation == Operation::Bundle {
        if let Err(e) = bundle_destination(&r.destination) {
            problems.add(line, format!("field destination: {e}"));
        }
        match BundleDisks::parse(&options, base) {
            Ok(disks) => options = disks.to_string(),
            Err(e) => problems.add(line, format!("field options: {e}")),
        }
    }
    if let Some(cloud) = target {
        let mut create = CreateOptions::default();
        create.parse_options(&options).ok();
        let resolved = targets::resolve(cloud, format, &mut create);
        for rule in &resolved.broken {
            problems.add(line, format!("field target: {}: {rule}", cloud.name()));
        }
    }
    if problems.count > before {
        return None;
    }
    let strip = |s: &str| s.strip_prefix("file://").unwrap_or(s).to_string();
    let local_or_url = |s: &str, local: bool| {
        if local {
            absolute(&strip(s), base)
        } else {
            absolute(s, base)
        }
    };
    Some(Item {
        line,
        source: local_or_url(&r.source, operation.local_source()),
        destination: local_or_url(&r.destination, operation.local_destination()),
        operation,
        format,
        options,
        target,
    })
}

/// A bundle item's destination `STORE#NAME`: the snapshot store and the bundle's name.
pub fn bundle_destination(destination: &str) -> Result<(&str, &str)> {
    let (store, name) = destination.rsplit_once('#').ok_or_else(|| {
        Error::invalid(format!(
            "'{destination}': a bundle item writes to STORE#NAME (a snapshot store and the \
             bundle's name)"
        ))
    })?;
    if store.is_empty() {
        return Err(Error::invalid(format!(
            "'{destination}': no store before '#'"
        )));
    }
    crate::bundle::check_name(name)?;
    Ok((store, name))
}

/// The disks of a bundle item besides its source (the system disk), from its `options`:
/// comma-separated `DEVICE=IMAGE` data disks in order, and `system=DEVICE` for the system
/// disk's device (`vda` by default). Relative image paths are taken from the job file's
/// directory; paths holding ',' or '=' cannot be written here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleDisks {
    pub system_device: String,
    /// (device, absolute image path), in order.
    pub data: Vec<(String, String)>,
}

impl BundleDisks {
    pub fn parse(options: &str, base: &Path) -> Result<BundleDisks> {
        let mut disks = BundleDisks {
            system_device: "vda".to_string(),
            data: Vec::new(),
        };
        for pair in options.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                Error::invalid(format!(
                    "'{pair}': bundle options are DEVICE=IMAGE data disks and system=DEVICE"
                ))
            })?;
            let (key, value) = (key.trim(), value.trim());
            if key == "system" {
                crate::bundle::check_device(value)?;
                disks.system_device = value.to_string();
            } else if value.is_empty() {
                return Err(Error::invalid(format!("data disk {key}: no image")));
            } else {
                crate::bundle::check_device(key)?;
                disks.data.push((key.to_string(), absolute(value, base)));
            }
        }
        let mut devices: Vec<&str> = disks.data.iter().map(|(d, _)| d.as_str()).collect();
        devices.push(&disks.system_device);
        devices.sort_unstable();
        if let Some(w) = devices.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::invalid(format!("device {} given twice", w[0])));
        }
        Ok(disks)
    }
}

/// The canonical form, which [`BundleDisks::parse`] reads back.
impl std::fmt::Display for BundleDisks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "system={}", self.system_device)?;
        for (device, path) in &self.data {
            write!(f, ",{device}={path}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Vec<Item>> {
        parse("jobs", text.as_bytes(), Path::new("/base"))
    }

    #[test]
    fn csv_and_json_lines_give_the_same_items() {
        let csv = "source,destination,format\na.vhd,out/a.qcow2,qcow2\n\n\"b,1.raw\",/abs/b.raw,\n";
        let json = "{\"source\":\"a.vhd\",\"destination\":\"out/a.qcow2\",\"format\":\"qcow2\"}\n\
                    {\"source\":\"b,1.raw\",\"destination\":\"/abs/b.raw\"}\n";
        let a = parse_str(csv).unwrap();
        let b = parse_str(json).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].source, "/base/a.vhd");
        assert_eq!(a[0].destination, "/base/out/a.qcow2");
        assert_eq!(a[0].format, Some(Format::Qcow2));
        assert_eq!(a[1].source, "/base/b,1.raw");
        assert_eq!(a[1].operation, Operation::Convert);
        assert_eq!((a[0].line, a[1].line), (2, 4));
        let canon = |v: &[Item]| v.iter().map(Item::canonical).collect::<Vec<_>>();
        assert_eq!(canon(&a), canon(&b));
    }

    #[test]
    fn targets_come_from_the_cloud_table() {
        let items = parse_str(
            "source,destination,operation,target\n\
             a.raw,s3://b/a.vhd,push,azure\n\
             b.raw,s3://b/b.vmdk,push,aws\n\
             c.raw,c.qcow2,convert,alibaba\n\
             d.raw,d.tar.gz,convert,gce\n",
        )
        .unwrap();
        let outputs: Vec<_> = items[..3]
            .iter()
            .map(|i| i.image_output(Format::Raw).unwrap())
            .collect();
        assert_eq!(outputs[0].0, Format::Vhd);
        assert_eq!(outputs[0].1.options["subformat"], "fixed");
        assert_eq!(outputs[1].0, Format::Vmdk);
        assert_eq!(outputs[1].1.options["subformat"], "streamOptimized");
        assert_eq!(outputs[2].0, Format::Qcow2);
        assert!(matches!(
            items[3].output(Format::Raw).unwrap().0,
            Output::GceTarball
        ));
        let e = parse_str(
            "source,destination,format,target\n\
             a.raw,a.qcow2,qcow2,azure\n\
             c.raw,c.raw,,moon\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 2: field target: azure: format"), "{e}");
        assert!(e.contains("line 3: field target:"), "{e}");
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = parse_str("source,destination,colour\na,b,red\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("line 1: column 3: unknown field 'colour'"),
            "{e}"
        );
        let e = parse_str("{\"source\":\"a\",\"destination\":\"b\",\"colour\":1}\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("jobs: line 1: unknown field `colour`"),
            "{e}"
        );
        let text = "source,destination,operation,format\n\
                    a,x.raw,,\n\
                    b,x.raw,,\n\
                    c,y.raw,copy,\n\
                    d,s3://b/k,,\n\
                    e,z.raw,,qcow3\n\
                    ,w.raw,,\n";
        let e = parse_str(text).unwrap_err().to_string();
        for want in [
            "line 3: field destination: same as line 2",
            "line 4: field operation: unknown operation 'copy'",
            "line 5: field destination: convert takes a local path here, not a URL",
            "line 6: field format:",
            "line 7: field source: missing",
        ] {
            assert!(e.contains(want), "{want} not in {e}");
        }
        assert!(parse_str("source,destination\n").is_err());
        assert!(parse_str("source,destination\na,b,c\n").is_err());
        let e = parse_str("source,destination,operation\na,s3://b/k,bundle\n").unwrap_err();
        assert!(e.to_string().contains("writes to STORE#NAME"), "{e}");
        let items = parse_str(
            "source,destination,operation,options\n\
             a.raw,s3://b/store#vm-1,bundle,\"system=sda,sdb=d/b.raw\"\n\
             c.raw,store#vm-2,bundle,\n",
        )
        .unwrap();
        assert_eq!(items[0].options, "system=sda,sdb=/base/d/b.raw");
        assert_eq!(items[1].destination, "/base/store#vm-2");
        let disks = BundleDisks::parse(&items[0].options, Path::new("/")).unwrap();
        assert_eq!(
            disks.data,
            [("sdb".to_string(), "/base/d/b.raw".to_string())]
        );
        let e = parse_str("source,destination,operation,options\na,s#v,bundle,\"vda=x\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("device vda given twice"), "{e}");
    }

    #[test]
    fn operations_check_their_fields() {
        let items = parse_str(
            "source,destination,operation,target\n\
             a.raw,s3://b/a.vhd,push,azure\n\
             s3://b/a.vhd,a2.raw,pull,\n\
             a.raw,s3://b/store,snapshot,\n",
        )
        .unwrap();
        assert_eq!(items[0].image_output(Format::Raw).unwrap().0, Format::Vhd);
        assert_eq!(items[1].source, "s3://b/a.vhd");
        assert_eq!(items[1].destination, "/base/a2.raw");
        assert!(parse_str("source,destination,operation\na.raw,s3://b/p/,push\n").is_err());
        assert!(
            parse_str("source,destination,operation,format\na,s3://b/s,snapshot,raw\n").is_err()
        );
    }
}
