//! blake3 of large files on every core. BLAKE3 is a tree: an input splits at subtree
//! boundaries into pieces whose chaining values merge into exactly the hash a sequential
//! read gives (`blake3::hazmat`, the crate's own API for this). Splitting lets the two cores
//! of a device share one 64 MiB file instead of one core hashing it while the other idles.
//!
//! The tree shape is blake3's: a subtree of `len` bytes has a left child of
//! `left_subtree_len(len)` bytes (a power-of-two number of chunks) and the rest on the
//! right. `pieces` and `merge` walk that same shape, so they always agree.

use crate::engine::Hash;
use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Inputs above this are split; pieces are at most this long. Large enough that the merge is
/// free and each piece keeps blake3's SIMD busy, small enough that three 64 MiB files spread
/// evenly over two cores.
pub const PIECE_BYTES: u64 = 4 * 1024 * 1024;

/// The pieces of an input of `len` bytes, in order, as (offset, length). One piece (the whole
/// input) when `len <= PIECE_BYTES`.
pub fn pieces(len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity((len / PIECE_BYTES + 1) as usize);
    split(0, len, &mut out);
    out
}

fn split(offset: u64, len: u64, out: &mut Vec<(u64, u64)>) {
    if len <= PIECE_BYTES {
        out.push((offset, len));
        return;
    }
    let left = left_subtree_len(len);
    split(offset, left, out);
    split(offset + left, len - left, out);
}

/// What hashing one piece gives: the root hash when the piece is the whole input, otherwise
/// the chaining value of its subtree.
#[derive(Clone, Copy)]
pub enum PieceHash {
    Root(Hash),
    Subtree(ChainingValue),
}

/// A hasher for the piece at `offset` of an input of `len` bytes.
pub fn piece_hasher(offset: u64, len: u64) -> PieceHasher {
    let mut h = blake3::Hasher::new();
    if offset > 0 {
        h.set_input_offset(offset);
    }
    PieceHasher { h, root: offset == 0 && len <= PIECE_BYTES }
}

pub struct PieceHasher {
    h: blake3::Hasher,
    root: bool,
}

impl PieceHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.h.update(bytes);
    }

    pub fn finish(self) -> PieceHash {
        if self.root {
            PieceHash::Root(self.h.finalize().into())
        } else {
            PieceHash::Subtree(self.h.finalize_non_root())
        }
    }
}

/// The hash of an input of `len` bytes from the hashes of its `pieces(len)`, in order.
pub fn merge(len: u64, hashes: &[PieceHash]) -> Hash {
    if let [PieceHash::Root(h)] = hashes {
        return *h;
    }
    let mut it = hashes.iter();
    let left = left_subtree_len(len);
    let l = subtree(left, &mut it);
    let r = subtree(len - left, &mut it);
    debug_assert!(it.next().is_none(), "more piece hashes than pieces");
    merge_subtrees_root(&l, &r, Mode::Hash).into()
}

fn subtree<'a>(len: u64, it: &mut impl Iterator<Item = &'a PieceHash>) -> ChainingValue {
    if len <= PIECE_BYTES {
        return match it.next() {
            Some(PieceHash::Subtree(cv)) => *cv,
            // `pieces` and `merge` share one shape; anything else is a bug in the caller.
            _ => panic!("piece hashes do not match the tree shape"),
        };
    }
    let left = left_subtree_len(len);
    let l = subtree(left, it);
    let r = subtree(len - left, it);
    merge_subtrees_non_root(&l, &r, Mode::Hash)
}

/// Hashes every input whose length is `Some`, all their pieces in one pool on every worker;
/// `piece(i, offset, len)` hashes one piece of input `i`. Returns each input's merged hash
/// (`None` where its length is `None`). The first error stops new pieces and is returned.
pub fn hash_split(
    lens: &[Option<u64>],
    piece: impl Fn(usize, u64, u64) -> crate::error::Result<PieceHash> + Sync,
) -> crate::error::Result<Vec<Option<Hash>>> {
    let mut work: Vec<(usize, u64, u64)> = Vec::new();
    for (i, len) in lens.iter().enumerate() {
        if let Some(len) = *len {
            work.extend(pieces(len).into_iter().map(|(off, n)| (i, off, n)));
        }
    }
    let hashes = crate::parallel::try_map(&work, |&(i, off, n)| piece(i, off, n))?;
    let mut by_input: Vec<Vec<PieceHash>> = vec![Vec::new(); lens.len()];
    for (&(i, _, _), h) in work.iter().zip(hashes) {
        by_input[i].push(h);
    }
    Ok(lens.iter().zip(by_input).map(|(len, hs)| len.map(|len| merge(len, &hs))).collect())
}

/// Hashes the piece (`offset`, `piece_len`) of `file`, an input of `len` bytes, with pread
/// (threads share the descriptor). A file shorter than `len` is an error, never a short hash.
pub fn hash_piece(
    file: &File,
    len: u64,
    offset: u64,
    piece_len: u64,
) -> std::io::Result<PieceHash> {
    crate::fsutil::with_io_buffer(|buf| {
        let mut hasher = piece_hasher(offset, len);
        let mut done = 0u64;
        while done < piece_len {
            let want = buf.len().min((piece_len - done) as usize);
            let n = file.read_at(&mut buf[..want], offset + done)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while being hashed",
                ));
            }
            hasher.update(&buf[..n]);
            done += n as u64;
        }
        Ok(hasher.finish())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn data(len: usize) -> Vec<u8> {
        crate::testdata::noise(len, 0x2545_f491_4f6c_dd1d)
    }

    /// Lengths around every boundary the split can meet: empty, one chunk, one piece, just
    /// over a piece, powers of two and their neighbours, and an uneven large size.
    const LENGTHS: &[u64] = &[
        0,
        1,
        1024,
        1025,
        PIECE_BYTES - 1,
        PIECE_BYTES,
        PIECE_BYTES + 1,
        2 * PIECE_BYTES,
        2 * PIECE_BYTES + 1,
        3 * PIECE_BYTES + 4097,
        8 * PIECE_BYTES - 1024,
        8 * PIECE_BYTES + 1,
        21 * PIECE_BYTES + 12_345,
    ];

    #[test]
    fn merged_pieces_equal_the_sequential_hash() {
        let all = data(*LENGTHS.iter().max().unwrap() as usize);
        for &len in LENGTHS {
            let input = &all[..len as usize];
            let ps = pieces(len);
            let hashes: Vec<PieceHash> = ps
                .iter()
                .map(|&(off, n)| {
                    let mut h = piece_hasher(off, len);
                    h.update(&input[off as usize..(off + n) as usize]);
                    h.finish()
                })
                .collect();
            assert_eq!(merge(len, &hashes), Hash::of(input), "length {len}");
        }
    }

    #[test]
    fn pieces_cover_the_input_once_and_are_bounded() {
        for &len in LENGTHS {
            let ps = pieces(len);
            let mut next = 0;
            for &(off, n) in &ps {
                assert_eq!(off, next, "length {len}: gap or overlap");
                assert!(n <= PIECE_BYTES, "length {len}: piece of {n}");
                next = off + n;
            }
            assert_eq!(next, len);
            assert_eq!(ps.len() == 1, len <= PIECE_BYTES, "length {len}");
        }
    }

    #[test]
    fn hash_split_merges_each_input_and_skips_the_others() {
        let all = data((3 * PIECE_BYTES + 5) as usize);
        let lens = [Some(3 * PIECE_BYTES + 5), None, Some(10), Some(0)];
        let got = hash_split(&lens, |i, off, n| {
            let mut h = piece_hasher(off, lens[i].unwrap());
            h.update(&all[off as usize..(off + n) as usize]);
            Ok(h.finish())
        })
        .unwrap();
        assert_eq!(
            got,
            vec![Some(Hash::of(&all)), None, Some(Hash::of(&all[..10])), Some(Hash::of(b""))]
        );
        let failed = hash_split(&lens, |_, _, _| Err(crate::error::Error::internal("boom")));
        assert_eq!(failed.unwrap_err().code, crate::error::ErrorCode::InternalError);
    }

    #[test]
    fn hashing_a_file_by_pieces_matches_and_a_shrunk_file_is_an_error() {
        let len = 3 * PIECE_BYTES + 77;
        let bytes = data(len as usize);
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes).unwrap();
        let hashes: Vec<PieceHash> =
            pieces(len).iter().map(|&(o, n)| hash_piece(&f, len, o, n).unwrap()).collect();
        assert_eq!(merge(len, &hashes), Hash::of(&bytes));
        f.set_len(len - 10).unwrap();
        let last = *pieces(len).last().unwrap();
        assert_eq!(
            hash_piece(&f, len, last.0, last.1).err().unwrap().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
    }
}
