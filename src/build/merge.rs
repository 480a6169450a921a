//! Merging layers into one tree with OCI semantics (whiteouts, opaque directories,
//! replacement, hardlinks), then flattening it into the index's entry table.

use super::layer::{split_last, LayerResult, RawEntry, RawKind};
use super::BuildError;
use crate::format::{Entry, Kind, Xattr, CHUNK_SIZE, NONE};
use std::collections::{BTreeMap, HashMap, VecDeque};

#[derive(Clone, Debug)]
struct Content {
    layer: u32,
    offset: u64,
    size: u64,
    sha256: [u8; 32],
    chunks: Vec<[u8; 32]>,
}

#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    rdev: (u32, u32),
    link_target: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    content: Option<Content>,
    inode: u64,
    children: BTreeMap<Vec<u8>, usize>,
}

/// The flattened tree: the index's entry, xattr and chunk hash tables.
pub struct Flat {
    /// Entries, breadth-first.
    pub entries: Vec<Entry>,
    /// Extended attributes.
    pub xattrs: Vec<Xattr>,
    /// Chunk hashes of files larger than `CHUNK_SIZE`.
    pub chunk_hashes: Vec<[u8; 32]>,
}

/// The merged tree under construction.
pub struct Tree {
    nodes: Vec<Node>,
    next_inode: u64,
    created: i64,
}

fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

/// Most symlinks followed while resolving one path (Linux's `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

fn show(path: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(path))
}

impl Tree {
    /// An empty tree whose synthesized directories get time `created`.
    pub fn new(created: i64) -> Tree {
        let mut t = Tree {
            nodes: Vec::new(),
            next_inode: 0,
            created,
        };
        let root = t.synthetic_dir();
        t.nodes.push(root);
        t
    }

    fn synthetic_dir(&mut self) -> Node {
        self.next_inode += 1;
        Node {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: self.created,
            mtime_nsec: 0,
            rdev: (0, 0),
            link_target: Vec::new(),
            xattrs: Vec::new(),
            content: None,
            inode: self.next_inode,
            children: BTreeMap::new(),
        }
    }

    /// The directory at `path`, walked from the root as containerd and umoci extract a
    /// layer: a symlink met on the way is followed (relative to its directory, an absolute
    /// target from the root, `..` never above the root), so that `lib/x` lands in
    /// `usr/lib` when `lib` is a symlink to it. With `create`, missing directories are
    /// created (also where a dangling symlink points); without, `Ok(None)` when a
    /// component is missing or not a directory. A component that is a file (or device,
    /// FIFO) is an error with `create`, as it is for those extractors.
    fn resolve_dir(&mut self, path: &[u8], create: bool) -> Result<Option<usize>, String> {
        let mut todo: VecDeque<Vec<u8>> = components(path).map(<[u8]>::to_vec).collect();
        // The directories from the root down to `cur`, for `..`.
        let mut above: Vec<usize> = Vec::new();
        let mut cur = 0;
        let mut followed = 0;
        while let Some(c) = todo.pop_front() {
            match c.as_slice() {
                b"." => continue,
                b".." => {
                    cur = above.pop().unwrap_or(0);
                    continue;
                }
                _ => {}
            }
            let next = match self.nodes[cur].children.get(&c) {
                Some(&id) => id,
                None if create => {
                    let d = self.synthetic_dir();
                    self.nodes.push(d);
                    let id = self.nodes.len() - 1;
                    self.nodes[cur].children.insert(c, id);
                    id
                }
                None => return Ok(None),
            };
            match self.nodes[next].kind {
                Kind::Dir => {
                    above.push(cur);
                    cur = next;
                }
                Kind::Symlink => {
                    followed += 1;
                    if followed > MAX_SYMLINKS {
                        return Err(format!(
                            "more than {MAX_SYMLINKS} symlinks on the way to {}",
                            show(path)
                        ));
                    }
                    let target = &self.nodes[next].link_target;
                    if target.starts_with(b"/") {
                        above.clear();
                        cur = 0;
                    }
                    for t in components(target).collect::<Vec<_>>().into_iter().rev() {
                        todo.push_front(t.to_vec());
                    }
                }
                _ if create => {
                    return Err(format!(
                        "{} is not a directory (a file of a lower layer or of this one)",
                        show(path)
                    ))
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// The entry at `path`: its directory as [`Tree::resolve_dir`] finds it, then the last
    /// component itself (not followed: a whiteout removes a symlink, a hardlink names it).
    fn find(&mut self, path: &[u8]) -> Option<usize> {
        let (dir, name) = split_last(path);
        let d = self.resolve_dir(dir, false).ok()??;
        self.nodes[d].children.get(name).copied()
    }

    fn remove(&mut self, path: &[u8]) {
        let (dir, name) = split_last(path);
        if let Ok(Some(d)) = self.resolve_dir(dir, false) {
            self.nodes[d].children.remove(name);
        }
    }

    /// Apply one layer (index `layer`) on top of the tree.
    pub fn apply(&mut self, layer: u32, result: LayerResult) -> Result<(), BuildError> {
        // Whiteouts and opaque markers hide lower layers only, so apply them first.
        for e in &result.entries {
            match e.kind {
                RawKind::Whiteout => self.remove(&e.path),
                RawKind::Opaque => {
                    if let Ok(Some(d)) = self.resolve_dir(&e.path, false) {
                        self.nodes[d].children.clear();
                    }
                }
                _ => {}
            }
        }
        for e in result.entries {
            if matches!(e.kind, RawKind::Whiteout | RawKind::Opaque) {
                continue;
            }
            self.add(layer, e)?;
        }
        Ok(())
    }

    fn add(&mut self, layer: u32, e: RawEntry) -> Result<(), BuildError> {
        let mut node = match &e.kind {
            RawKind::Hardlink(target) => {
                let t = self.find(target).ok_or_else(|| {
                    BuildError::Merge(format!(
                        "hardlink {} points at {}, which does not exist",
                        show(&e.path),
                        show(target)
                    ))
                })?;
                let tn = &self.nodes[t];
                if tn.kind == Kind::Dir {
                    return Err(BuildError::Merge(format!(
                        "hardlink {} points at directory {}",
                        show(&e.path),
                        show(target)
                    )));
                }
                tn.clone()
            }
            _ => {
                self.next_inode += 1;
                Node {
                    kind: match &e.kind {
                        RawKind::File => Kind::File,
                        RawKind::Dir => Kind::Dir,
                        RawKind::Symlink(_) => Kind::Symlink,
                        RawKind::CharDevice => Kind::CharDevice,
                        RawKind::BlockDevice => Kind::BlockDevice,
                        _ => Kind::Fifo,
                    },
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                    mtime: e.mtime,
                    mtime_nsec: e.mtime_nsec,
                    rdev: e.rdev,
                    link_target: match &e.kind {
                        RawKind::Symlink(t) => t.clone(),
                        _ => Vec::new(),
                    },
                    xattrs: e.xattrs,
                    content: (e.kind == RawKind::File).then_some(Content {
                        layer,
                        offset: e.data_offset,
                        size: e.size,
                        sha256: e.sha256,
                        chunks: e.chunks,
                    }),
                    inode: self.next_inode,
                    children: BTreeMap::new(),
                }
            }
        };
        if e.path.is_empty() {
            // The root itself: take its attributes, keep its children.
            let root = &mut self.nodes[0];
            root.mode = node.mode;
            root.uid = node.uid;
            root.gid = node.gid;
            root.mtime = node.mtime;
            root.mtime_nsec = node.mtime_nsec;
            root.xattrs = node.xattrs;
            return Ok(());
        }
        let (dir, name) = split_last(&e.path);
        let parent = self
            .resolve_dir(dir, true)
            .map_err(|m| BuildError::Merge(format!("entry {}: {m}", show(&e.path))))?
            .unwrap_or(0);
        match self.nodes[parent].children.get(name) {
            Some(&old) if self.nodes[old].kind == Kind::Dir && node.kind == Kind::Dir => {
                // Directory over directory: new attributes, same children.
                node.children = std::mem::take(&mut self.nodes[old].children);
                node.inode = self.nodes[old].inode;
                self.nodes[old] = node;
            }
            _ => {
                self.nodes.push(node);
                let id = self.nodes.len() - 1;
                self.nodes[parent].children.insert(name.to_vec(), id);
            }
        }
        Ok(())
    }

    /// Flatten into the index's tables: breadth-first, so that the children of every
    /// directory are contiguous and sorted by name.
    pub fn flatten(self) -> Result<Flat, BuildError> {
        let mut order: Vec<(usize, u32, Vec<u8>)> = vec![(0, 0, Vec::new())];
        let mut first_child = vec![NONE; 1];
        let mut queue = VecDeque::from([0usize]);
        while let Some(pos) = queue.pop_front() {
            let id = order[pos].0;
            let kids = &self.nodes[id].children;
            if !kids.is_empty() {
                first_child[pos] = order.len() as u32;
            }
            for (name, &child) in kids {
                queue.push_back(order.len());
                order.push((child, pos as u32, name.clone()));
                first_child.push(NONE);
            }
            if order.len() > (u32::MAX - 1) as usize {
                return Err(BuildError::Merge("more than 4 billion entries".into()));
            }
        }
        // Hardlink groups: surviving names per inode.
        let mut groups: HashMap<u64, Vec<u32>> = HashMap::new();
        for (i, (id, _, _)) in order.iter().enumerate() {
            if self.nodes[*id].kind == Kind::File {
                groups
                    .entry(self.nodes[*id].inode)
                    .or_default()
                    .push(i as u32);
            }
        }
        let mut entries = Vec::with_capacity(order.len());
        let mut xattrs = Vec::new();
        let mut chunks = Vec::new();
        for (i, (id, parent, name)) in order.iter().enumerate() {
            let n = &self.nodes[*id];
            let mut e = Entry {
                name: name.clone(),
                parent: *parent,
                kind: n.kind as u8,
                mode: n.mode,
                uid: n.uid,
                gid: n.gid,
                mtime: n.mtime,
                mtime_nsec: n.mtime_nsec,
                rdev_major: n.rdev.0,
                rdev_minor: n.rdev.1,
                link_target: n.link_target.clone(),
                first_child: first_child[i],
                child_count: n.children.len() as u32,
                hardlink_to: NONE,
                nlink: 1,
                layer: NONE,
                first_chunk: NONE,
                first_xattr: 0,
                xattr_count: 0,
                ..Default::default()
            };
            let group = groups
                .get(&n.inode)
                .filter(|g| g.len() > 1 && g[0] != i as u32);
            if let Some(group) = group {
                // Another name of an inode held by an earlier entry: fixed-size attributes
                // are copied, content location, chunk hashes and xattrs live only there.
                e.kind = Kind::Hardlink as u8;
                e.hardlink_to = group[0];
                e.nlink = group.len() as u32;
                if let Some(c) = &n.content {
                    e.size = c.size;
                    e.sha256 = c.sha256;
                }
                entries.push(e);
                continue;
            }
            if !n.xattrs.is_empty() {
                e.first_xattr = xattrs.len() as u32;
                e.xattr_count = n.xattrs.len() as u32;
                xattrs.extend(n.xattrs.iter().map(|(k, v)| Xattr {
                    name: k.clone(),
                    value: v.clone(),
                }));
            }
            if e.child_count == 0 {
                e.first_child = NONE;
            }
            match n.kind {
                Kind::Dir => {
                    let subdirs = n
                        .children
                        .values()
                        .filter(|&&c| self.nodes[c].kind == Kind::Dir)
                        .count();
                    e.nlink = 2 + subdirs as u32;
                }
                Kind::Symlink => e.size = n.link_target.len() as u64,
                Kind::File => {
                    let c = n.content.as_ref().expect("files have content");
                    e.size = c.size;
                    e.sha256 = c.sha256;
                    if c.size > 0 {
                        e.layer = c.layer;
                        e.data_offset = c.offset;
                    }
                    if c.size > CHUNK_SIZE {
                        e.first_chunk = chunks.len() as u32;
                        chunks.extend_from_slice(&c.chunks);
                    }
                    e.nlink = groups[&n.inode].len() as u32;
                }
                _ => {}
            }
            entries.push(e);
        }
        Ok(Flat {
            entries,
            xattrs,
            chunk_hashes: chunks,
        })
    }
}
