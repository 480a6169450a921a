//! The byte layout that `format-spec/README.md` documents, asserted against the archived
//! types rkyv generates. If one of these fails, the on-disk format changed: update the spec,
//! the test vectors and `tools/clipread.py`, and bump the format version.

use super::header::{Header, HEADER_SIZE};
use super::types::{
    ArchivedCheckpoint, ArchivedEntry, ArchivedImage, ArchivedIndex, ArchivedLayer, ArchivedXattr,
    Checkpoint, Entry, Image, Index, Layer, Xattr,
};
use core::mem::{align_of, offset_of, size_of};
use rkyv::vec::ArchivedVec;

#[test]
fn header_layout() {
    assert_eq!(size_of::<Header>(), HEADER_SIZE);
    assert_eq!(HEADER_SIZE, 64);
    assert_eq!(offset_of!(Header, magic), 0);
    assert_eq!(offset_of!(Header, version_major), 8);
    assert_eq!(offset_of!(Header, version_minor), 10);
    assert_eq!(offset_of!(Header, flags), 12);
    assert_eq!(offset_of!(Header, payload_offset), 16);
    assert_eq!(offset_of!(Header, payload_len), 24);
    assert_eq!(offset_of!(Header, payload_xxh3), 32);
    assert_eq!(offset_of!(Header, entry_count), 40);
    assert_eq!(offset_of!(Header, layer_count), 44);
    assert_eq!(offset_of!(Header, windows_len), 48);
    assert_eq!(offset_of!(Header, reserved), 56);
}

#[test]
fn vec_layout() {
    // ArchivedVec<T>: i32 relative offset, then u32 length; 8 bytes, 4-aligned.
    assert_eq!(size_of::<ArchivedVec<u8>>(), 8);
    assert_eq!(align_of::<ArchivedVec<u8>>(), 4);
    assert_eq!(size_of::<ArchivedVec<ArchivedEntry>>(), 8);
    let v = rkyv::to_bytes::<rkyv::rancor::Error>(&vec![7u8, 8, 9]).unwrap();
    // The vector's bytes come first, its 8-byte header is the root at the end.
    assert_eq!(v.len(), 12);
    assert_eq!(&v[..3], &[7, 8, 9]);
    let off = i32::from_le_bytes(v[4..8].try_into().unwrap());
    let len = u32::from_le_bytes(v[8..12].try_into().unwrap());
    assert_eq!(
        (off, len),
        (-4, 3),
        "offset is relative to the offset field itself"
    );
}

#[test]
fn index_layout() {
    assert_eq!(size_of::<ArchivedIndex>(), 88);
    assert_eq!(align_of::<ArchivedIndex>(), 8);
    assert_eq!(offset_of!(ArchivedIndex, image), 0);
    assert_eq!(offset_of!(ArchivedIndex, layers), 48);
    assert_eq!(offset_of!(ArchivedIndex, entries), 56);
    assert_eq!(offset_of!(ArchivedIndex, xattrs), 64);
    assert_eq!(offset_of!(ArchivedIndex, chunk_hashes), 72);
    assert_eq!(offset_of!(ArchivedIndex, chunk_size), 80);
    assert_eq!(offset_of!(ArchivedIndex, reserved), 84);
}

#[test]
fn image_layout() {
    assert_eq!(size_of::<ArchivedImage>(), 48);
    assert_eq!(align_of::<ArchivedImage>(), 8);
    assert_eq!(offset_of!(ArchivedImage, created), 0);
    assert_eq!(offset_of!(ArchivedImage, reference), 8);
    assert_eq!(offset_of!(ArchivedImage, source), 16);
    assert_eq!(offset_of!(ArchivedImage, manifest_digest), 24);
    assert_eq!(offset_of!(ArchivedImage, config_digest), 32);
    assert_eq!(offset_of!(ArchivedImage, platform), 40);
}

#[test]
fn layer_layout() {
    assert_eq!(size_of::<ArchivedLayer>(), 56);
    assert_eq!(align_of::<ArchivedLayer>(), 8);
    assert_eq!(offset_of!(ArchivedLayer, compressed_size), 0);
    assert_eq!(offset_of!(ArchivedLayer, uncompressed_size), 8);
    assert_eq!(offset_of!(ArchivedLayer, digest), 16);
    assert_eq!(offset_of!(ArchivedLayer, diff_id), 24);
    assert_eq!(offset_of!(ArchivedLayer, media_type), 32);
    assert_eq!(offset_of!(ArchivedLayer, checkpoints), 40);
    assert_eq!(offset_of!(ArchivedLayer, compression), 48);
    assert_eq!(offset_of!(ArchivedLayer, reserved), 49);
}

#[test]
fn checkpoint_layout() {
    assert_eq!(size_of::<ArchivedCheckpoint>(), 48);
    assert_eq!(align_of::<ArchivedCheckpoint>(), 8);
    assert_eq!(offset_of!(ArchivedCheckpoint, in_offset), 0);
    assert_eq!(offset_of!(ArchivedCheckpoint, out_offset), 8);
    assert_eq!(offset_of!(ArchivedCheckpoint, window_offset), 16);
    assert_eq!(offset_of!(ArchivedCheckpoint, window_xxh3), 24);
    assert_eq!(offset_of!(ArchivedCheckpoint, window_stored_len), 32);
    assert_eq!(offset_of!(ArchivedCheckpoint, window_len), 36);
    assert_eq!(offset_of!(ArchivedCheckpoint, bits), 40);
    assert_eq!(offset_of!(ArchivedCheckpoint, window_encoding), 41);
    assert_eq!(offset_of!(ArchivedCheckpoint, reserved), 42);
}

#[test]
fn entry_layout() {
    assert_eq!(size_of::<ArchivedEntry>(), 136);
    assert_eq!(align_of::<ArchivedEntry>(), 8);
    let expected = [
        (offset_of!(ArchivedEntry, size), 0),
        (offset_of!(ArchivedEntry, data_offset), 8),
        (offset_of!(ArchivedEntry, mtime), 16),
        (offset_of!(ArchivedEntry, name), 24),
        (offset_of!(ArchivedEntry, link_target), 32),
        (offset_of!(ArchivedEntry, sha256), 40),
        (offset_of!(ArchivedEntry, parent), 72),
        (offset_of!(ArchivedEntry, first_child), 76),
        (offset_of!(ArchivedEntry, child_count), 80),
        (offset_of!(ArchivedEntry, hardlink_to), 84),
        (offset_of!(ArchivedEntry, nlink), 88),
        (offset_of!(ArchivedEntry, mode), 92),
        (offset_of!(ArchivedEntry, uid), 96),
        (offset_of!(ArchivedEntry, gid), 100),
        (offset_of!(ArchivedEntry, mtime_nsec), 104),
        (offset_of!(ArchivedEntry, rdev_major), 108),
        (offset_of!(ArchivedEntry, rdev_minor), 112),
        (offset_of!(ArchivedEntry, layer), 116),
        (offset_of!(ArchivedEntry, first_chunk), 120),
        (offset_of!(ArchivedEntry, first_xattr), 124),
        (offset_of!(ArchivedEntry, xattr_count), 128),
        (offset_of!(ArchivedEntry, kind), 132),
        (offset_of!(ArchivedEntry, reserved), 133),
    ];
    for (i, (got, want)) in expected.iter().enumerate() {
        assert_eq!(got, want, "Entry field #{i}");
    }
}

#[test]
fn xattr_layout() {
    assert_eq!(size_of::<ArchivedXattr>(), 16);
    assert_eq!(align_of::<ArchivedXattr>(), 4);
    assert_eq!(offset_of!(ArchivedXattr, name), 0);
    assert_eq!(offset_of!(ArchivedXattr, value), 8);
}

#[test]
fn chunk_hash_is_inline_32_bytes() {
    assert_eq!(size_of::<[u8; 32]>(), 32);
    assert_eq!(align_of::<rkyv::Archived<[u8; 32]>>(), 1);
    assert_eq!(size_of::<rkyv::Archived<[u8; 32]>>(), 32);
}

/// Serialize a small index and decode it by hand, with nothing but the rules in the spec:
/// root at `len - 88`, vectors as (i32 offset from the field, u32 length), little-endian.
#[test]
fn hand_decoding_matches_spec() {
    let index = Index {
        image: Image {
            created: -5,
            reference: b"ref".to_vec(),
            source: vec![],
            manifest_digest: b"sha256:m".to_vec(),
            config_digest: b"sha256:c".to_vec(),
            platform: b"linux/amd64".to_vec(),
        },
        layers: vec![Layer {
            compressed_size: 10,
            uncompressed_size: 20,
            digest: b"d".to_vec(),
            diff_id: b"i".to_vec(),
            media_type: b"mt".to_vec(),
            checkpoints: vec![Checkpoint {
                in_offset: 3,
                out_offset: 0,
                window_offset: 0x1122334455,
                window_xxh3: 0x0a0b0c0d0e0f1011,
                window_stored_len: 3,
                window_len: 3,
                bits: 5,
                window_encoding: 0,
                reserved: [0; 6],
            }],
            compression: 1,
            reserved: [0; 7],
        }],
        entries: vec![
            Entry {
                name: vec![],
                kind: 1,
                first_child: 1,
                child_count: 1,
                nlink: 2,
                mode: 0o755,
                ..Default::default()
            },
            Entry {
                name: b"a".to_vec(),
                size: 0x0102030405060708,
                mode: 0o4755,
                kind: 0,
                sha256: [0xab; 32],
                first_xattr: 0,
                xattr_count: 1,
                first_chunk: u32::MAX,
                ..Default::default()
            },
        ],
        xattrs: vec![Xattr {
            name: b"user.x".to_vec(),
            value: b"yes".to_vec(),
        }],
        chunk_hashes: vec![[0x11; 32]],
        chunk_size: 1 << 20,
        reserved: 0,
    };
    let p = rkyv::to_bytes::<rkyv::rancor::Error>(&index).unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().unwrap());
    let vec_at = |o: usize| {
        let rel = i32::from_le_bytes(p[o..o + 4].try_into().unwrap()) as i64;
        ((o as i64 + rel) as usize, u32_at(o + 4) as usize)
    };
    let bytes_at = |o: usize| {
        let (s, n) = vec_at(o);
        p[s..s + n].to_vec()
    };
    assert_eq!(p.len() % 8, 0);
    let root = p.len() - 88;
    assert_eq!(root % 8, 0);
    assert_eq!(u64_at(root) as i64, -5);
    assert_eq!(bytes_at(root + 8), b"ref");
    assert_eq!(vec_at(root + 16).1, 0);
    assert_eq!(bytes_at(root + 40), b"linux/amd64");
    assert_eq!(u32_at(root + 80), 1 << 20);
    let (layers, nl) = vec_at(root + 48);
    assert_eq!((nl, layers % 8), (1, 0));
    assert_eq!(u64_at(layers + 8), 20);
    assert_eq!(bytes_at(layers + 32), b"mt");
    assert_eq!(p[layers + 48], 1);
    let (cps, ncp) = vec_at(layers + 40);
    assert_eq!((ncp, cps % 8), (1, 0));
    assert_eq!(u64_at(cps), 3);
    assert_eq!(
        (u64_at(cps + 16), u64_at(cps + 24)),
        (0x1122334455, 0x0a0b0c0d0e0f1011)
    );
    assert_eq!(
        (u32_at(cps + 32), u32_at(cps + 36), p[cps + 40], p[cps + 41]),
        (3, 3, 5, 0)
    );
    let (entries, ne) = vec_at(root + 56);
    assert_eq!((ne, entries % 8), (2, 0));
    let e1 = entries + 136;
    assert_eq!(u64_at(e1), 0x0102030405060708);
    assert_eq!(bytes_at(e1 + 24), b"a");
    assert_eq!(&p[e1 + 40..e1 + 72], &[0xab; 32]);
    assert_eq!(u32_at(e1 + 92), 0o4755);
    assert_eq!(u32_at(e1 + 120), u32::MAX);
    assert_eq!(u32_at(e1 + 128), 1);
    assert_eq!(p[e1 + 132], 0);
    assert_eq!(
        (u32_at(entries + 76), u32_at(entries + 80), p[entries + 132]),
        (1, 1, 1)
    );
    let (xs, nx) = vec_at(root + 64);
    assert_eq!(nx, 1);
    assert_eq!(bytes_at(xs), b"user.x");
    assert_eq!(bytes_at(xs + 8), b"yes");
    let (ch, nch) = vec_at(root + 72);
    assert_eq!((nch, &p[ch..ch + 32]), (1, &[0x11u8; 32][..]));
}
