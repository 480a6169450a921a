//! Index entries as FUSE attributes.

use crate::format::types::ArchivedEntry;
use crate::format::{FormatError, IndexFile, Kind};
use fuser::{FileAttr, FileType, INodeNo};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Size reported for directories (as ext4 and overlayfs do for small ones).
pub const DIR_SIZE: u64 = 4096;
/// Preferred I/O size reported in `st_blksize` (and the block size of `statfs`).
pub const BLKSIZE: u32 = 4096;

/// `st_blksize` of regular files: the cache piece. Programs that read in `st_blksize`
/// units (`cat`, `cp`) then make the kernel's readahead start at piece boundaries, so
/// each FUSE read is one whole piece, answered without joining two (a copy into fresh
/// memory). Before, `cat`'s first 128 KiB read made windows of 256 KiB, 512 KiB, then
/// 1 MiB at 768 KiB + n MiB, each straddling two pieces.
pub const FILE_BLKSIZE: u32 = crate::format::types::CHUNK_SIZE as u32;

/// FUSE inode number of entry `i` (the root, entry 0, is `FUSE_ROOT_ID` 1).
pub fn ino_of(i: u32) -> INodeNo {
    INodeNo(i as u64 + 1)
}

/// Entry index of FUSE inode `ino`, if it can be one.
pub fn entry_of(ino: INodeNo) -> Option<u32> {
    ino.0.checked_sub(1).and_then(|i| u32::try_from(i).ok())
}

/// The FUSE file type of an entry kind byte (hardlinks are regular files).
pub fn file_type(kind: u8) -> Result<FileType, FormatError> {
    Ok(match Kind::from_u8(kind) {
        Some(Kind::File | Kind::Hardlink) => FileType::RegularFile,
        Some(Kind::Dir) => FileType::Directory,
        Some(Kind::Symlink) => FileType::Symlink,
        Some(Kind::CharDevice) => FileType::CharDevice,
        Some(Kind::BlockDevice) => FileType::BlockDevice,
        Some(Kind::Fifo) => FileType::NamedPipe,
        None => return Err(FormatError::Invalid(format!("unknown entry kind {kind}"))),
    })
}

/// `sec` + `nsec` since the epoch (negative seconds are before it).
pub fn time_of(sec: i64, nsec: u32) -> SystemTime {
    let nsec = Duration::from_nanos(nsec.min(999_999_999) as u64);
    if sec >= 0 {
        UNIX_EPOCH + Duration::from_secs(sec as u64) + nsec
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + nsec
    }
}

/// The kernel's 32-bit device encoding (`new_encode_dev`), which FUSE's `rdev` carries.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Attributes of the inode that entry `i` names (a hardlink reports its canonical file).
pub fn attr_of(index: &IndexFile, i: u32) -> Result<FileAttr, FormatError> {
    let canonical = index.inode_of(i)?;
    attr_of_entry(canonical, index.entry(canonical)?)
}

fn attr_of_entry(i: u32, e: &ArchivedEntry) -> Result<FileAttr, FormatError> {
    let kind = file_type(e.kind)?;
    let size = if kind == FileType::Directory {
        DIR_SIZE
    } else {
        e.size.to_native()
    };
    let t = time_of(e.mtime.to_native(), e.mtime_nsec.to_native());
    let rdev = match kind {
        FileType::CharDevice | FileType::BlockDevice => {
            encode_dev(e.rdev_major.to_native(), e.rdev_minor.to_native())
        }
        _ => 0,
    };
    Ok(FileAttr {
        ino: ino_of(i),
        size,
        blocks: size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind,
        // A symlink's permissions are never used, and Linux shows 0777 for every one (as an
        // extraction of the image does), whatever bits its tar header carried.
        perm: if kind == FileType::Symlink {
            0o777
        } else {
            (e.mode.to_native() & 0o7777) as u16
        },
        nlink: e.nlink.to_native().max(1),
        uid: e.uid.to_native(),
        gid: e.gid.to_native(),
        rdev,
        blksize: if kind == FileType::RegularFile {
            FILE_BLKSIZE
        } else {
            BLKSIZE
        },
        flags: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_encode_like_the_kernel() {
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(8, 0), 0x800);
        // Large minors go to the high bits, as new_encode_dev does.
        assert_eq!(
            encode_dev(259, 0x12345),
            0x45 | (259 << 8) | (0x12300 << 12)
        );
    }

    #[test]
    fn times_before_and_after_the_epoch() {
        assert_eq!(time_of(1, 5), UNIX_EPOCH + Duration::new(1, 5));
        assert_eq!(
            time_of(-2, 500_000_000),
            UNIX_EPOCH - Duration::from_millis(1500)
        );
    }

    #[test]
    fn inode_numbers() {
        assert_eq!(ino_of(0), INodeNo(1));
        assert_eq!(entry_of(INodeNo(1)), Some(0));
        assert_eq!(entry_of(INodeNo(0)), None);
    }
}
