//! Registry credentials and authentication challenges: where a user's login comes from
//! (environment, docker config `auths`, credential helpers) and how a `WWW-Authenticate`
//! header is read. Secrets are held in [`Secret`], whose `Debug` never shows them.

use super::reference::DOCKER_HUB;
use super::SourceError;
use base64::Engine;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Environment variable with a registry user name (used for every registry, with
/// [`ENV_PASSWORD`]), taking precedence over the docker config.
pub const ENV_USERNAME: &str = "CLIP_REGISTRY_USERNAME";
/// Environment variable with the password or access token for [`ENV_USERNAME`].
pub const ENV_PASSWORD: &str = "CLIP_REGISTRY_PASSWORD";

/// A string that must not be shown: `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for building a request header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A login for one registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// User name and password (or personal access token).
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: Secret,
    },
    /// An OAuth2 refresh token (`identitytoken` in the docker config), exchanged at the
    /// token realm.
    IdentityToken(Secret),
}

impl Credentials {
    /// The `Authorization: Basic …` value, for basic credentials.
    pub fn basic_header(&self) -> Option<String> {
        match self {
            Credentials::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{}", password.expose()))
            )),
            Credentials::IdentityToken(_) => None,
        }
    }
}

/// One challenge of a `WWW-Authenticate` header: its scheme (lowercased) and parameters
/// (names lowercased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer` or `basic`.
    pub scheme: String,
    /// `realm`, `service`, `scope`, `error`, …
    pub params: BTreeMap<String, String>,
}

/// Parse a `WWW-Authenticate` value such as
/// `Bearer realm="https://auth.example/token",service="registry",scope="repository:a:pull"`.
/// Returns `None` when it is not of that shape.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, mut rest) = match header.find(char::is_whitespace) {
        Some(i) => (&header[..i], header[i..].trim_start()),
        None => (header, ""),
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    let mut params = BTreeMap::new();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let name = rest[..eq].trim().to_ascii_lowercase();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(q) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => v.extend(chars.next().map(|(_, c)| c)),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            rest = &q[end?..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        params.insert(name, value);
        rest = rest.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// The docker config file to read: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

/// Host of a docker config `auths` key: `https://index.docker.io/v1/` → `index.docker.io`.
fn auths_key_host(key: &str) -> &str {
    let k = key.split_once("://").map(|(_, r)| r).unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// Whether an `auths` key host names `registry` (Docker Hub has several names).
fn host_matches(key_host: &str, registry: &str) -> bool {
    let hub = |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    key_host.eq_ignore_ascii_case(registry)
        || (hub(registry) && hub(&key_host.to_ascii_lowercase()))
}

/// The server URL docker uses when talking to credential helpers.
fn helper_server_url(registry: &str) -> String {
    if registry == DOCKER_HUB {
        "https://index.docker.io/v1/".into()
    } else {
        registry.to_string()
    }
}

fn config_error(path: &std::path::Path, why: impl std::fmt::Display) -> SourceError {
    SourceError::Registry(format!(
        "docker config {}: {why}; fix or remove the file",
        path.display()
    ))
}

/// Find the login for `registry` (`docker.io`, `host:port`): [`ENV_USERNAME`] and
/// [`ENV_PASSWORD`] first, then the docker config (`credHelpers`, `auths`, `credsStore`).
/// `Ok(None)` means anonymous access.
pub fn lookup_credentials(registry: &str) -> Result<Option<Credentials>, SourceError> {
    if let (Ok(username), Ok(password)) = (std::env::var(ENV_USERNAME), std::env::var(ENV_PASSWORD))
    {
        return Ok(Some(Credentials::Basic {
            username,
            password: Secret::new(password),
        }));
    }
    let Some(path) = docker_config_path() else {
        return Ok(None);
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(config_error(&path, e)),
    };
    let config: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| config_error(&path, e))?;
    from_docker_config(&config, registry, &path)
}

fn from_docker_config(
    config: &serde_json::Value,
    registry: &str,
    path: &std::path::Path,
) -> Result<Option<Credentials>, SourceError> {
    if let Some(helpers) = config.get("credHelpers").and_then(|v| v.as_object()) {
        if let Some(name) = helpers
            .iter()
            .find(|(k, _)| host_matches(auths_key_host(k), registry))
            .and_then(|(_, v)| v.as_str())
        {
            return run_helper(name, registry);
        }
    }
    if let Some(auths) = config.get("auths").and_then(|v| v.as_object()) {
        if let Some((_, entry)) = auths
            .iter()
            .find(|(k, _)| host_matches(auths_key_host(k), registry))
        {
            if let Some(tok) = entry
                .get("identitytoken")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
            {
                return Ok(Some(Credentials::IdentityToken(Secret::new(tok))));
            }
            if let Some(auth) = entry
                .get("auth")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
            {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| {
                        config_error(
                            path,
                            format!("the auths entry for {registry} is not base64"),
                        )
                    })?;
                let decoded = String::from_utf8(decoded).map_err(|_| {
                    config_error(path, format!("the auths entry for {registry} is not UTF-8"))
                })?;
                let (username, password) = decoded.split_once(':').ok_or_else(|| {
                    config_error(
                        path,
                        format!("the auths entry for {registry} is not user:password"),
                    )
                })?;
                return Ok(Some(Credentials::Basic {
                    username: username.into(),
                    password: Secret::new(password),
                }));
            }
            if let (Some(u), Some(p)) = (
                entry.get("username").and_then(|v| v.as_str()),
                entry.get("password").and_then(|v| v.as_str()),
            ) {
                return Ok(Some(Credentials::Basic {
                    username: u.into(),
                    password: Secret::new(p),
                }));
            }
        }
    }
    if let Some(store) = config
        .get("credsStore")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
    {
        return run_helper(store, registry);
    }
    Ok(None)
}

/// Ask `docker-credential-NAME get` for the login of `registry`. A helper that is not
/// installed or has no entry means anonymous access (logged, without secrets).
fn run_helper(name: &str, registry: &str) -> Result<Option<Credentials>, SourceError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let program = format!("docker-credential-{name}");
    let child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("credential helper {program} for {registry} cannot run ({e}); trying anonymous access");
            return Ok(None);
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading its input is handled by its status below.
        let _ = stdin.write_all(helper_server_url(registry).as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| SourceError::Io {
        context: format!("running {program}"),
        source,
    })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
        tracing::debug!(
            "{program} has no credentials for {registry} ({}): {msg}",
            out.status
        );
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    struct HelperOut {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let h: HelperOut = serde_json::from_slice(&out.stdout).map_err(|_| {
        SourceError::Registry(format!(
            "credential helper {program} printed something that is not its JSON answer"
        ))
    })?;
    if h.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(if h.username == "<token>" {
        Credentials::IdentityToken(Secret::new(h.secret))
    } else {
        Credentials::Basic {
            username: h.username,
            password: Secret::new(h.secret),
        }
    }))
}

/// Percent-encode a query parameter value (RFC 3986 unreserved characters stay).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/python:pull");
        let c = parse_challenge(r#"Basic realm="a \"quoted\", realm""#).unwrap();
        assert_eq!(
            (c.scheme.as_str(), c.params["realm"].as_str()),
            ("basic", r#"a "quoted", realm"#)
        );
        let c = parse_challenge("bearer realm=http://x/t, error=invalid_token").unwrap();
        assert_eq!(c.params["realm"], "http://x/t");
        assert_eq!(c.params["error"], "invalid_token");
        assert!(parse_challenge("Bearer realm=\"unterminated").is_none());
    }

    #[test]
    fn docker_config_auths() {
        let p = std::path::Path::new("config.json");
        let cfg = serde_json::json!({"auths": {
            "https://index.docker.io/v1/": {"auth": base64::engine::general_purpose::STANDARD.encode("hub:pw:with:colons")},
            "127.0.0.1:5000": {"auth": base64::engine::general_purpose::STANDARD.encode("local:pw")},
            "http://other:1234/v2/": {"identitytoken": "refresh"},
        }});
        let hub = from_docker_config(&cfg, "docker.io", p).unwrap().unwrap();
        assert_eq!(
            hub,
            Credentials::Basic {
                username: "hub".into(),
                password: Secret::new("pw:with:colons")
            }
        );
        assert_eq!(
            hub.basic_header().unwrap(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("hub:pw:with:colons")
            )
        );
        let local = from_docker_config(&cfg, "127.0.0.1:5000", p)
            .unwrap()
            .unwrap();
        assert!(matches!(local, Credentials::Basic { ref username, .. } if username == "local"));
        assert_eq!(
            from_docker_config(&cfg, "other:1234", p).unwrap(),
            Some(Credentials::IdentityToken(Secret::new("refresh")))
        );
        assert_eq!(
            from_docker_config(&cfg, "nowhere.example", p).unwrap(),
            None
        );
        let bad = serde_json::json!({"auths": {"h": {"auth": "%%%"}}});
        assert!(from_docker_config(&bad, "h", p).is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Credentials::Basic {
            username: "u".into(),
            password: Secret::new("hunter2"),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn escaping() {
        assert_eq!(
            query_escape("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}
