//! OCI image JSON (index, manifest, config), media types, platform choice, and resolving a
//! reference through a [`Source`] into the list of layers to index.

use crate::source::{Source, SourceError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// OCI image index.
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config.
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer.
pub const MT_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI uncompressed layer.
pub const MT_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Docker manifest list.
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 2 manifest.
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker gzip layer.
pub const MT_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker uncompressed layer.
pub const MT_DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Annotation holding a tag in an OCI layout's index.json.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A content descriptor.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:…`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Platform (image index entries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Target platform of a manifest.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Platform {
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `v8` for arm64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine (`linux/amd64`, `linux/arm64/v8`, …).
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            architecture: arch.into(),
            os: "linux".into(),
            variant: None,
        }
    }

    /// Parse `os/arch[/variant]`.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut it = s.split('/');
        let os = it.next().filter(|x| !x.is_empty())?;
        let arch = it.next().filter(|x| !x.is_empty())?;
        let variant = it.next().map(String::from);
        if it.next().is_some() {
            return None;
        }
        Some(Platform {
            architecture: arch.into(),
            os: os.into(),
            variant,
        })
    }

    /// Whether a manifest for `other` runs here (variant ignored when we did not ask for one).
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || self.variant == other.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image index or manifest list.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// 2.
    pub schema_version: u32,
    /// Media type, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests.
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// 2.
    pub schema_version: u32,
    /// Media type, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// Layers, lowest first.
    pub layers: Vec<Descriptor>,
}

/// The parts of an image config clip uses.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Config {
    /// Creation time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// e.g. `amd64`.
    #[serde(default)]
    pub architecture: String,
    /// e.g. `linux`.
    #[serde(default)]
    pub os: String,
    /// Layer diff_ids.
    pub rootfs: RootFs,
}

/// `rootfs` of an image config.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct RootFs {
    /// `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// sha256 of each uncompressed layer.
    pub diff_ids: Vec<String>,
}

/// How a layer blob is compressed, from its media type.
pub fn layer_compression(media_type: &str) -> Option<crate::format::Compression> {
    use crate::format::Compression;
    match media_type {
        MT_OCI_LAYER_GZIP | MT_DOCKER_LAYER_GZIP => Some(Compression::Gzip),
        MT_OCI_LAYER_TAR | MT_DOCKER_LAYER_TAR => Some(Compression::None),
        _ => None,
    }
}

/// One layer to index.
#[derive(Debug, Clone)]
pub struct LayerDesc {
    /// Blob digest.
    pub digest: String,
    /// Blob size.
    pub size: u64,
    /// Media type.
    pub media_type: String,
    /// Compression.
    pub compression: crate::format::Compression,
    /// Expected sha256 of the uncompressed tar (`sha256:…`).
    pub diff_id: String,
}

/// An image resolved down to its layers.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The reference as given.
    pub reference: String,
    /// Digest of the chosen manifest.
    pub manifest_digest: String,
    /// Digest of the config.
    pub config_digest: String,
    /// Platform of the chosen manifest.
    pub platform: Platform,
    /// Config `created`, seconds since the epoch (0 if absent or unparsable).
    pub created: i64,
    /// Layers, lowest first.
    pub layers: Vec<LayerDesc>,
}

/// sha256 of `bytes` as `sha256:<hex>`.
pub fn digest_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn parse_json<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, SourceError> {
    serde_json::from_slice(bytes)
        .map_err(|e| SourceError::BadImage(format!("{what} is not valid JSON: {e}")))
}

fn is_index(media_type: &str, bytes: &[u8]) -> bool {
    media_type == MT_OCI_INDEX
        || media_type == MT_DOCKER_LIST
        || (media_type.is_empty()
            && serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .is_some_and(|v| v.get("manifests").is_some()))
}

/// Pick the manifest for `want` from an image index.
pub fn choose_platform<'a>(
    index: &'a ImageIndex,
    want: &Platform,
) -> Result<&'a Descriptor, SourceError> {
    index
        .manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
        .or_else(|| {
            // Variant not given and none matched exactly: accept any variant of the arch.
            index.manifests.iter().find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == want.os && p.architecture == want.architecture)
            })
        })
        .ok_or_else(|| {
            let have: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                .collect();
            SourceError::NoPlatform {
                want: want.to_string(),
                have: have.join(", "),
            }
        })
}

/// Resolve `reference` (a tag or digest understood by `source`) down to its layers:
/// image index → platform → manifest → config, with every fetched document checked
/// against its digest.
pub fn resolve(
    source: &dyn Source,
    reference: &str,
    platform: &Platform,
) -> Result<ResolvedImage, SourceError> {
    let (mut media_type, mut bytes, mut digest) = source.manifest(reference)?;
    let mut depth = 0;
    while is_index(&media_type, &bytes) {
        depth += 1;
        if depth > 4 {
            return Err(SourceError::BadImage(
                "image indexes nest more than 4 deep".into(),
            ));
        }
        let index: ImageIndex = parse_json("image index", &bytes)?;
        let d = choose_platform(&index, platform)?.clone();
        let (mt, b, dg) = source.manifest(&d.digest)?;
        media_type = if mt.is_empty() {
            d.media_type.clone()
        } else {
            mt
        };
        bytes = b;
        digest = dg;
    }
    if !(media_type.is_empty() || media_type == MT_OCI_MANIFEST || media_type == MT_DOCKER_MANIFEST)
    {
        return Err(SourceError::BadImage(format!(
            "unsupported manifest media type {media_type}"
        )));
    }
    let manifest: Manifest = parse_json("manifest", &bytes)?;
    let config_bytes = source.read_small_blob(&manifest.config.digest, manifest.config.size)?;
    let config: Config = parse_json("image config", &config_bytes)?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(SourceError::BadImage(format!(
            "manifest lists {} layers but the config has {} diff_ids",
            manifest.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (d, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
        let compression = layer_compression(&d.media_type).ok_or_else(|| {
            SourceError::BadImage(format!(
                "layer {} has unsupported media type {} (clip reads gzip and uncompressed tar layers)",
                d.digest, d.media_type
            ))
        })?;
        layers.push(LayerDesc {
            digest: d.digest.clone(),
            size: d.size,
            media_type: d.media_type.clone(),
            compression,
            diff_id: diff_id.clone(),
        });
    }
    Ok(ResolvedImage {
        reference: reference.to_string(),
        manifest_digest: digest,
        config_digest: manifest.config.digest.clone(),
        platform: Platform {
            architecture: config.architecture.clone(),
            os: config.os.clone(),
            variant: None,
        },
        created: config
            .created
            .as_deref()
            .and_then(parse_rfc3339)
            .unwrap_or(0),
        layers,
    })
}

/// Seconds since the epoch of an RFC 3339 UTC time like `2025-05-20T00:00:00Z` (fractions
/// and numeric offsets accepted).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        rest = r.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let offset = match rest {
        "Z" | "z" | "" => 0,
        r if r.len() == 6 => {
            let sign = if r.starts_with('-') { -1 } else { 1 };
            sign * (r.get(1..3)?.parse::<i64>().ok()? * 3600
                + r.get(4..6)?.parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + se - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2025-05-20T00:00:00Z"), Some(1747699200));
        assert_eq!(
            parse_rfc3339("2025-05-20T02:00:00.123+02:00"),
            Some(1747699200)
        );
        assert_eq!(parse_rfc3339("garbage"), None);
    }

    #[test]
    fn platform_parse_and_match() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!(Platform::parse("linux").is_none());
        let want = Platform::parse("linux/arm64").unwrap();
        assert!(want.matches(&p));
        assert!(!p.matches(&Platform::parse("linux/arm64/v7").unwrap()));
    }
}
