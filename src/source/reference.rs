//! Docker-style image references: `python:3.11` is `docker.io/library/python:3.11`, served by
//! `registry-1.docker.io`; `localhost:5000/team/app@sha256:…` names a registry with a port, a
//! nested repository and a pinned digest.

use super::SourceError;

/// The registry that references without a domain name.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves the Docker Hub API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry domain with optional port, normalized (`docker.io`, `localhost:5000`).
    pub registry: String,
    /// Repository path (`library/python`, `team/app`).
    pub repository: String,
    /// Tag, if given.
    pub tag: Option<String>,
    /// Pinned manifest digest (`sha256:…`), if given.
    pub digest: Option<String>,
}

fn bad(s: &str, why: &str) -> SourceError {
    SourceError::Reference {
        reference: s.into(),
        why: why.into(),
    }
}

/// Whether `c` is a valid repository path component: lowercase alphanumerics separated by
/// `.`, `_`, `__` or runs of `-`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let x = b[i];
        if x.is_ascii_lowercase() || x.is_ascii_digit() {
            i += 1;
            continue;
        }
        // A separator: `.`, `_`, `__` or one or more `-`, always followed by an alphanumeric.
        let sep_start = i;
        match x {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == sep_start
            || !b
                .get(i)
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return false;
        }
    }
    true
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Whether `d` is a `sha256:` digest with 64 lowercase hex digits (the only kind clip checks).
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

fn valid_domain(d: &str) -> bool {
    // `host`, `host:port`, `[v6]` or `[v6]:port`; `port` keeps its leading colon.
    let (host, port, v6) = match d.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((h, p)) => (h, p, true),
            None => return false,
        },
        None => match d.find(':') {
            Some(i) => (&d[..i], &d[i..], false),
            None => (d, "", false),
        },
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    let host_ok = if v6 {
        host.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    };
    port_ok && host_ok
}

impl Reference {
    /// Parse a reference as docker does: `[DOMAIN/]PATH[:TAG][@DIGEST]`. The first path
    /// component is a domain when it contains `.` or `:` or is `localhost`; otherwise the
    /// image is on Docker Hub, where a one-component path gets the `library/` prefix.
    pub fn parse(s: &str) -> Result<Reference, SourceError> {
        if s.is_empty() {
            return Err(bad(s, "empty reference"));
        }
        let (rest, digest) = match s.rsplit_once('@') {
            Some((r, d)) => {
                if !valid_digest(d) {
                    return Err(bad(
                        s,
                        "the digest after @ must be sha256: and 64 lowercase hex digits",
                    ));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let t = &rest[last_slash + i + 1..];
                if !valid_tag(t) {
                    return Err(bad(s, "invalid tag (letters, digits, _ . -, at most 128)"));
                }
                (&rest[..last_slash + i], Some(t.to_string()))
            }
            None => (rest, None),
        };
        let (mut registry, mut repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains(['.', ':']) || first == "localhost" || first.starts_with('[') =>
            {
                if !valid_domain(first) {
                    return Err(bad(s, "invalid registry host"));
                }
                (first.to_ascii_lowercase(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if registry == "index.docker.io" || registry == DOCKER_HUB_API {
            registry = DOCKER_HUB.to_string();
        }
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        if repository.len() > 255 {
            return Err(bad(s, "repository name longer than 255 characters"));
        }
        if !repository.split('/').all(valid_component) {
            return Err(bad(
                s,
                "invalid repository name (lowercase letters, digits and . _ - between path components)",
            ));
        }
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry's manifest endpoint for: the digest when pinned, else the
    /// tag, else `latest`.
    pub fn manifest_reference(&self) -> String {
        self.digest
            .clone()
            .or_else(|| self.tag.clone())
            .unwrap_or_else(|| "latest".into())
    }

    /// The host (and port) that serves the registry API.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// Whether the registry is on this machine (`localhost`, `127.0.0.0/8`, `::1`).
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.registry)
    }
}

/// Whether `host[:port]` names this machine.
pub fn is_loopback_host(host_port: &str) -> bool {
    let host = match host_port.strip_prefix('[') {
        Some(r) => r.split(']').next().unwrap_or(""),
        None => host_port
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(host_port),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("python:3.11");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/python", Some("3.11"))
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.to_string(), "docker.io/library/python:3.11");
        assert_eq!(p("python").manifest_reference(), "latest");
        assert_eq!(p("bitnami/redis").repository, "bitnami/redis");
        assert_eq!(p("docker.io/python").repository, "library/python");
        assert_eq!(p("index.docker.io/library/python").registry, "docker.io");
    }

    #[test]
    fn domains_ports_nesting_digests() {
        let r = p(&format!("localhost:5000/x@{D}"));
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "x", None)
        );
        assert_eq!(r.manifest_reference(), D);
        assert!(r.is_loopback());
        let r = p(&format!("127.0.0.1:5000/team/sub/app:v1.2@{D}"));
        assert_eq!(r.repository, "team/sub/app");
        assert_eq!(r.tag.as_deref(), Some("v1.2"));
        assert_eq!(r.manifest_reference(), D, "the digest wins over the tag");
        assert_eq!(
            r.to_string(),
            format!("127.0.0.1:5000/team/sub/app:v1.2@{D}")
        );
        let r = p("ghcr.io/owner/img:tag");
        assert_eq!((r.registry.as_str(), r.api_host()), ("ghcr.io", "ghcr.io"));
        assert!(!r.is_loopback());
        let r = p("[::1]:5000/a/b:c");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("[::1]:5000", "a/b")
        );
        assert!(r.is_loopback());
        assert_eq!(p("localhost/app").registry, "localhost");
        assert_eq!(
            p("my-registry.example.com:443/a__b/c-d.e").repository,
            "a__b/c-d.e"
        );
    }

    #[test]
    fn rejects() {
        for s in [
            "",
            "Python:3",
            "a//b",
            "a/b:",
            "a@sha256:abc",
            "host:99999/a",
            "-a/b",
            "a_/b",
            "a/b:-tag",
            "/abs/path",
            "./rel",
        ] {
            assert!(Reference::parse(s).is_err(), "{s:?} should be rejected");
        }
    }
}
