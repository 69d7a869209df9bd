//! Stored (uncompressed) zip archives as torch writes them: a writer with 64-byte aligned
//! record data and a reader of the central directory.

use std::collections::HashMap;

/// A minimal writer of uncompressed (stored) zip archives with 64-byte aligned record data.
#[derive(Default)]
pub(super) struct ZipWriter {
    buf: Vec<u8>,
    central: Vec<u8>,
    count: usize,
}

const ZIP_ALIGN: usize = 64;
/// DOS date 1980-01-01.
const DOS_DATE: u16 = 0x21;

impl ZipWriter {
    pub(super) fn add(&mut self, name: &str, data: &[u8]) {
        let offset = self.buf.len();
        let crc = crc32fast::hash(data);
        let base = offset + 30 + name.len();
        let mut pad = (ZIP_ALIGN - base % ZIP_ALIGN) % ZIP_ALIGN;
        if pad > 0 && pad < 4 {
            pad += ZIP_ALIGN;
        }
        let b = &mut self.buf;
        b.extend(0x0403_4b50u32.to_le_bytes());
        b.extend(20u16.to_le_bytes()); // version needed
        b.extend(0u16.to_le_bytes()); // flags
        b.extend(0u16.to_le_bytes()); // stored
        b.extend(0u16.to_le_bytes()); // time
        b.extend(DOS_DATE.to_le_bytes());
        b.extend(crc.to_le_bytes());
        b.extend((data.len() as u32).to_le_bytes());
        b.extend((data.len() as u32).to_le_bytes());
        b.extend((name.len() as u16).to_le_bytes());
        b.extend((pad as u16).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        if pad > 0 {
            b.extend(b"FB");
            b.extend(((pad - 4) as u16).to_le_bytes());
            b.extend(std::iter::repeat_n(0u8, pad - 4));
        }
        b.extend_from_slice(data);

        let c = &mut self.central;
        c.extend(0x0201_4b50u32.to_le_bytes());
        c.extend(20u16.to_le_bytes()); // made by
        c.extend(20u16.to_le_bytes()); // needed
        c.extend(0u16.to_le_bytes());
        c.extend(0u16.to_le_bytes());
        c.extend(0u16.to_le_bytes());
        c.extend(DOS_DATE.to_le_bytes());
        c.extend(crc.to_le_bytes());
        c.extend((data.len() as u32).to_le_bytes());
        c.extend((data.len() as u32).to_le_bytes());
        c.extend((name.len() as u16).to_le_bytes());
        c.extend(0u16.to_le_bytes()); // extra
        c.extend(0u16.to_le_bytes()); // comment
        c.extend(0u16.to_le_bytes()); // disk
        c.extend(0u16.to_le_bytes()); // internal attributes
        c.extend(0u32.to_le_bytes()); // external attributes
        c.extend((offset as u32).to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        self.count += 1;
    }

    pub(super) fn finish(mut self) -> Result<Vec<u8>, String> {
        if self.buf.len() + self.central.len() > u32::MAX as usize || self.count > 0xffff {
            return Err("archive over 4 GiB or 65535 records (zip64) is not supported".into());
        }
        let cd_offset = self.buf.len();
        let cd_size = self.central.len();
        self.buf.extend_from_slice(&self.central);
        let b = &mut self.buf;
        b.extend(0x0605_4b50u32.to_le_bytes());
        b.extend(0u16.to_le_bytes());
        b.extend(0u16.to_le_bytes());
        b.extend((self.count as u16).to_le_bytes());
        b.extend((self.count as u16).to_le_bytes());
        b.extend((cd_size as u32).to_le_bytes());
        b.extend((cd_offset as u32).to_le_bytes());
        b.extend(0u16.to_le_bytes());
        Ok(self.buf)
    }
}

fn le_u16(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize)
}

fn le_u32(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

/// The records of a stored (uncompressed) zip archive: name → data range.
pub(super) fn zip_records(bytes: &[u8]) -> Result<HashMap<String, std::ops::Range<usize>>, String> {
    if bytes.len() < 22 {
        return Err("too short to be a zip archive".into());
    }
    let min = bytes.len().saturating_sub(22 + 0xffff);
    let eocd = (min..=bytes.len() - 22)
        .rev()
        .find(|&i| bytes[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or("no zip end-of-central-directory record")?;
    let bad = || "corrupt zip central directory".to_string();
    let count = le_u16(bytes, eocd + 10).ok_or_else(bad)?;
    let cd_offset = le_u32(bytes, eocd + 16).ok_or_else(bad)?;
    if count == 0xffff || cd_offset == 0xffff_ffff {
        return Err("zip64 archives (over 4 GiB) are not supported".into());
    }
    let mut records = HashMap::new();
    let mut at = cd_offset;
    for _ in 0..count {
        if le_u32(bytes, at) != Some(0x0201_4b50) {
            return Err(bad());
        }
        let method = le_u16(bytes, at + 10).ok_or_else(bad)?;
        let size = le_u32(bytes, at + 20).ok_or_else(bad)?;
        let name_len = le_u16(bytes, at + 28).ok_or_else(bad)?;
        let extra_len = le_u16(bytes, at + 30).ok_or_else(bad)?;
        let comment_len = le_u16(bytes, at + 32).ok_or_else(bad)?;
        let local = le_u32(bytes, at + 42).ok_or_else(bad)?;
        let name = bytes.get(at + 46..at + 46 + name_len).ok_or_else(bad)?;
        let name = String::from_utf8_lossy(name).into_owned();
        if method != 0 {
            return Err(format!(
                "zip record `{name}` is compressed (method {method}); torch archives are stored"
            ));
        }
        if le_u32(bytes, local) != Some(0x0403_4b50) {
            return Err(format!("zip record `{name}`: bad local header"));
        }
        let lname = le_u16(bytes, local + 26).ok_or_else(bad)?;
        let lextra = le_u16(bytes, local + 28).ok_or_else(bad)?;
        let start = local + 30 + lname + lextra;
        if start + size > bytes.len() {
            return Err(format!("zip record `{name}` runs past the end of the file"));
        }
        records.insert(name, start..start + size);
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(records)
}
