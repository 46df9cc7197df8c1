//! A buffered reader over a shared file that reads with `pread` at its own position, so
//! several threads can read one already-validated package through one file descriptor (no
//! shared offset, no reopening by path, which could find another file).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Small: most buffered reads are ZIP headers at scattered offsets (each would otherwise pull
/// in a large block), and content reads are large enough to bypass the buffer.
const BUF_BYTES: usize = 8 * 1024;

pub struct PosReader {
    file: Arc<File>,
    pos: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`; `buf` holds `buf_len` valid bytes.
    buf_start: u64,
    buf_len: usize,
}

impl PosReader {
    pub fn new(file: Arc<File>) -> PosReader {
        PosReader { file, pos: 0, buf: vec![0; BUF_BYTES], buf_start: 0, buf_len: 0 }
    }
}

impl Clone for PosReader {
    fn clone(&self) -> PosReader {
        PosReader {
            file: self.file.clone(),
            pos: self.pos,
            buf: vec![0; BUF_BYTES],
            buf_start: 0,
            buf_len: 0,
        }
    }
}

impl Read for PosReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let in_buf = self.pos >= self.buf_start && self.pos < self.buf_start + self.buf_len as u64;
        if !in_buf {
            if out.len() >= BUF_BYTES {
                // Large reads bypass the buffer.
                let n = self.file.read_at(out, self.pos)?;
                self.pos += n as u64;
                return Ok(n);
            }
            self.buf_len = self.file.read_at(&mut self.buf, self.pos)?;
            self.buf_start = self.pos;
            if self.buf_len == 0 {
                return Ok(0);
            }
        }
        let off = (self.pos - self.buf_start) as usize;
        let n = out.len().min(self.buf_len - off);
        out[..n].copy_from_slice(&self.buf[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for PosReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.file.metadata()?.len().checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_and_seeks_like_a_file() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let mut r = PosReader::new(Arc::new(f));
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        assert_eq!(all, data);
        r.seek(SeekFrom::Start(1000)).unwrap();
        let mut small = [0u8; 10];
        r.read_exact(&mut small).unwrap();
        assert_eq!(&small, &data[1000..1010]);
        r.seek(SeekFrom::End(-5)).unwrap();
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, &data[data.len() - 5..]);
        let mut c = r.clone();
        c.seek(SeekFrom::Start(7)).unwrap();
        c.read_exact(&mut small).unwrap();
        assert_eq!(&small, &data[7..17]);
    }
}
