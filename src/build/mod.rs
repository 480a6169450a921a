//! `clip-build`'s engine: resolve an image through a [`Source`], index its layers in
//! parallel (one streaming pass each), merge them and produce an [`Index`].

pub mod guard;
pub mod layer;
pub mod merge;
pub mod stream;

use crate::format::{Image, Index, CHUNK_SIZE};
use crate::oci::{self, Platform, ResolvedImage};
use crate::source::{Source, SourceError};
use rayon::prelude::*;
pub use stream::CheckpointPolicy;

/// Errors of the build layer.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Resolving or reading the image failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A layer could not be read, inflated or parsed.
    #[error("{0}")]
    Layer(String),
    /// The layers do not merge into a valid tree.
    #[error("merging layers: {0}")]
    Merge(String),
    /// gzip failure inside the producer thread.
    #[error(transparent)]
    Gzip(#[from] crate::zran::GzipError),
    /// I/O failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Options for [`build`].
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Platform to pick from an image index (host by default).
    pub platform: Option<Platform>,
    /// Checkpoint spacing.
    pub policy: CheckpointPolicy,
    /// Show a progress bar per layer on stderr.
    pub progress: bool,
}

/// A built index: the archived part and the window area its checkpoints point into
/// (`format::write::to_bytes` takes both).
pub struct Built {
    /// Everything but the checkpoint windows.
    pub index: Index,
    /// The stored checkpoint windows of all layers, layer after layer.
    pub windows: Vec<u8>,
}

/// Resolve `reference` in `source` and index the image.
pub fn build(
    source: &dyn Source,
    reference: &str,
    opts: &BuildOptions,
) -> Result<Built, BuildError> {
    let platform = opts.platform.clone().unwrap_or_else(Platform::host);
    let image = oci::resolve(source, reference, &platform)?;
    build_resolved(source, &image, opts)
}

/// Index an already resolved image.
pub fn build_resolved(
    source: &dyn Source,
    image: &ResolvedImage,
    opts: &BuildOptions,
) -> Result<Built, BuildError> {
    let multi = indicatif::MultiProgress::new();
    let bars: Vec<indicatif::ProgressBar> = image
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            if !opts.progress {
                return indicatif::ProgressBar::hidden();
            }
            let pb = multi.add(indicatif::ProgressBar::new(l.size));
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "layer {prefix:>2} {bar:30} {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} {msg}",
                )
                .expect("valid template"),
            );
            pb.set_prefix(i.to_string());
            pb.set_message(l.digest.chars().take(19).collect::<String>());
            pb
        })
        .collect();
    let results: Vec<layer::LayerResult> = image
        .layers
        .par_iter()
        .zip(bars)
        .map(|(l, pb)| layer::index_layer(source, l, opts.policy, pb))
        .collect::<Result<_, _>>()?;
    let mut layers = Vec::with_capacity(results.len());
    let mut windows = Vec::with_capacity(results.iter().map(|r| r.windows.len()).sum());
    let mut tree = merge::Tree::new(image.created);
    for (i, mut r) in results.into_iter().enumerate() {
        let mut layer = std::mem::take(&mut r.layer);
        for cp in &mut layer.checkpoints {
            cp.window_offset += windows.len() as u64;
        }
        windows.append(&mut r.windows);
        layers.push(layer);
        tree.apply(i as u32, r)?;
    }
    let merge::Flat {
        entries,
        xattrs,
        chunk_hashes,
    } = tree.flatten()?;
    let index = Index {
        image: Image {
            created: image.created,
            reference: image.reference.as_bytes().to_vec(),
            source: source.describe().into_bytes(),
            manifest_digest: image.manifest_digest.as_bytes().to_vec(),
            config_digest: image.config_digest.as_bytes().to_vec(),
            platform: image.platform.to_string().into_bytes(),
        },
        layers,
        entries,
        xattrs,
        chunk_hashes,
        chunk_size: CHUNK_SIZE as u32,
        reserved: 0,
    };
    Ok(Built { index, windows })
}
