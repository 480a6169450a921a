//! An OCI distribution registry as a [`Source`], over HTTP(S) with `ureq` (rustls, no
//! system OpenSSL).
//!
//! * Scheme: HTTPS, except plain HTTP for loopback registries (`localhost`, `127.0.0.0/8`,
//!   `::1`) as docker treats them as insecure. `CLIP_REGISTRY_PLAIN_HTTP=1` forces plain
//!   HTTP, `=0` forces HTTPS; `CLIP_REGISTRY_CA_FILE=ca.pem` trusts a private CA instead of
//!   the built-in roots; `CLIP_REGISTRY_INSECURE=1` skips certificate verification.
//! * Authentication: anonymous first; on a 401 the `WWW-Authenticate` challenge decides:
//!   `Bearer` fetches a token from the realm (with the login if there is one), cached until
//!   it expires or a request gets 401 again; `Basic` sends the login. Logins come from
//!   [`auth::lookup_credentials`] (environment, docker config, credential helpers) and are
//!   looked up only when a registry asks for them.
//! * Blobs: `Range` requests, redirects followed (the `Authorization` header is dropped when a
//!   redirect leaves the host) and their target used directly for the same blob for two
//!   minutes or until it stops answering, keep-alive connections returned to the pool,
//!   bounded retries with backoff on 5xx, 429 and connection failures, an interrupted body
//!   resumed from where it stopped, and a server that ignores `Range` (200 instead of 206)
//!   handled by skipping and truncating.

use super::auth::{self, Challenge, Credentials, Secret};
use super::reference::{self, Reference};
use super::{Source, SourceError};
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use ureq::http::Response;
use ureq::Body;

/// `1`/`true` forces plain HTTP for every registry, `0`/`false` forces HTTPS.
pub const ENV_PLAIN_HTTP: &str = "CLIP_REGISTRY_PLAIN_HTTP";
/// `1`/`true` skips TLS certificate verification.
pub const ENV_INSECURE: &str = "CLIP_REGISTRY_INSECURE";
/// A PEM file of CA certificates to trust instead of the built-in roots.
pub const ENV_CA_FILE: &str = "CLIP_REGISTRY_CA_FILE";

/// Prefix of [`Source::describe`] for a registry reached over HTTPS.
pub const RECORDED_HTTPS: &str = "registry://";
/// Prefix of [`Source::describe`] for a registry reached over plain HTTP.
pub const RECORDED_HTTP: &str = "registry+http://";

const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest or image index read.
const MANIFEST_LIMIT: u64 = 4 << 20;

/// How to reach registries.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Force plain HTTP (`Some(true)`) or HTTPS (`Some(false)`); `None`: plain HTTP for
    /// loopback registries only.
    pub plain_http: Option<bool>,
    /// Skip TLS certificate verification.
    pub insecure: bool,
    /// PEM CA certificates to trust instead of the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// The login to use instead of looking one up.
    pub credentials: Option<Credentials>,
    /// Retries of a failed request (5xx, 429, connection failure) and resumes of an
    /// interrupted body without progress in between.
    pub retries: u32,
    /// First retry delay; doubled each time, at most 4 s.
    pub backoff: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            plain_http: None,
            insecure: false,
            ca_file: None,
            credentials: None,
            retries: 4,
            backoff: Duration::from_millis(250),
        }
    }
}

fn env_flag(name: &str) -> Result<Option<bool>, SourceError> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => match v.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" => Ok(Some(true)),
            "0" | "false" | "no" | "" => Ok(Some(false)),
            _ => Err(SourceError::Registry(format!("{name}={v:?} is not 1 or 0"))),
        },
    }
}

impl RegistryOptions {
    /// Options from `CLIP_REGISTRY_PLAIN_HTTP`, `CLIP_REGISTRY_INSECURE` and
    /// `CLIP_REGISTRY_CA_FILE`.
    pub fn from_env() -> Result<RegistryOptions, SourceError> {
        Ok(RegistryOptions {
            plain_http: env_flag(ENV_PLAIN_HTTP)?,
            insecure: env_flag(ENV_INSECURE)?.unwrap_or(false),
            ca_file: std::env::var_os(ENV_CA_FILE)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            ..RegistryOptions::default()
        })
    }
}

/// What the client currently sends as `Authorization`.
enum AuthState {
    Anonymous,
    Basic(Secret),
    Bearer {
        token: Secret,
        expires: Instant,
        challenge: Challenge,
    },
}

/// The HTTP client of one repository, shared by the source and its blob readers.
struct Client {
    reference: Reference,
    /// `http://host:port` or `https://host`.
    base: String,
    plain_http: bool,
    agent: ureq::Agent,
    credentials: OnceLock<Result<Option<Credentials>, String>>,
    preset_credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
    retries: u32,
    backoff: Duration,
    /// Where blob requests were redirected (object storage, a CDN), by digest, until when
    /// to go there directly: a cold start makes dozens of range requests to the same few
    /// blobs, and each redirect costs a round trip to the registry.
    locations: Mutex<std::collections::HashMap<String, (String, Instant)>>,
}

/// How long a blob's redirect target is used directly. Registries sign these URLs for
/// minutes; one that expired earlier is answered with an error, and the registry is asked
/// again.
const LOCATION_TTL: Duration = Duration::from_secs(120);

/// An OCI distribution registry repository.
pub struct RegistrySource {
    client: Arc<Client>,
}

fn unreachable_msg(host: &str, what: impl std::fmt::Display, plain: bool) -> SourceError {
    let hint = if plain {
        format!("is the registry running and listening on {host}? (plain HTTP was used; set {ENV_PLAIN_HTTP}=0 for HTTPS)")
    } else {
        format!("is the registry running, is the network up? (for a plain-HTTP registry set {ENV_PLAIN_HTTP}=1)")
    };
    SourceError::Unreachable(format!("cannot reach registry {host}: {what}; {hint}"))
}

fn is_transient_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset
            | ConnectionAborted
            | BrokenPipe
            | UnexpectedEof
            | TimedOut
            | Interrupted
            | WouldBlock
    )
}

/// Registry error body: `{"errors":[{"code":"MANIFEST_UNKNOWN","message":"…"}]}`.
fn error_codes(resp: Response<Body>) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct E {
        #[serde(default)]
        code: String,
    }
    #[derive(serde::Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<E>,
    }
    let body = resp
        .into_body()
        .into_with_config()
        .limit(64 << 10)
        .read_to_vec()
        .unwrap_or_default();
    serde_json::from_slice::<Errors>(&body)
        .map(|e| e.errors.into_iter().map(|e| e.code).collect())
        .unwrap_or_default()
}

fn header<'a>(resp: &'a Response<Body>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

impl Client {
    fn login_hint(&self) -> String {
        format!(
            "log in with `docker login {}` (clip reads the docker config) or set {} and {}",
            self.reference.registry,
            auth::ENV_USERNAME,
            auth::ENV_PASSWORD
        )
    }

    fn repo_name(&self) -> String {
        format!("{}/{}", self.reference.registry, self.reference.repository)
    }

    fn credentials(&self) -> Result<Option<Credentials>, SourceError> {
        if let Some(c) = &self.preset_credentials {
            return Ok(Some(c.clone()));
        }
        self.credentials
            .get_or_init(|| {
                auth::lookup_credentials(&self.reference.registry).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(SourceError::Registry)
    }

    /// The `Authorization` value to send now, refreshing an expired bearer token.
    fn authorization(&self) -> Result<Option<String>, SourceError> {
        let mut state = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        if let AuthState::Bearer {
            expires, challenge, ..
        } = &*state
        {
            if Instant::now() >= *expires {
                tracing::debug!(
                    "bearer token for {} expired; fetching a new one",
                    self.repo_name()
                );
                let challenge = challenge.clone();
                *state = self.fetch_token(&challenge)?;
            }
        }
        Ok(match &*state {
            AuthState::Anonymous => None,
            AuthState::Basic(h) => Some(h.expose().to_string()),
            AuthState::Bearer { token, .. } => Some(format!("Bearer {}", token.expose())),
        })
    }

    /// Answer a 401: set up authentication from its `WWW-Authenticate` challenge.
    fn authenticate(&self, resp: &Response<Body>) -> Result<(), SourceError> {
        let challenge = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(auth::parse_challenge)
            .find(|c| c.scheme == "bearer" || c.scheme == "basic");
        let Some(challenge) = challenge else {
            return Err(SourceError::Denied(format!(
                "registry {} refused access to {} without saying how to authenticate; {}",
                self.reference.registry,
                self.repo_name(),
                self.login_hint()
            )));
        };
        let new_state = if challenge.scheme == "basic" {
            match self.credentials()? {
                Some(c @ Credentials::Basic { .. }) => {
                    AuthState::Basic(Secret::new(c.basic_header().expect("basic")))
                }
                _ => {
                    return Err(SourceError::Denied(format!(
                        "registry {} needs a login to pull {}; {}",
                        self.reference.registry,
                        self.repo_name(),
                        self.login_hint()
                    )))
                }
            }
        } else {
            self.fetch_token(&challenge)?
        };
        *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = new_state;
        Ok(())
    }

    /// Get a bearer token from the challenge's realm.
    fn fetch_token(&self, challenge: &Challenge) -> Result<AuthState, SourceError> {
        let realm = challenge
            .params
            .get("realm")
            .filter(|r| r.starts_with("http://") || r.starts_with("https://"));
        let Some(realm) = realm else {
            return Err(SourceError::Registry(format!(
                "registry {} asked for a bearer token without a usable realm URL",
                self.reference.registry
            )));
        };
        let scope = challenge
            .params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", self.reference.repository));
        let service = challenge.params.get("service").cloned().unwrap_or_default();
        let creds = self.credentials()?;
        let mut url = format!(
            "{realm}{}scope={}",
            if realm.contains('?') { '&' } else { '?' },
            auth::query_escape(&scope)
        );
        if !service.is_empty() {
            url.push_str(&format!("&service={}", auth::query_escape(&service)));
        }
        tracing::debug!(
            "fetching a bearer token for {} from {realm} (scope {scope})",
            self.repo_name()
        );
        let resp = self.with_retries(&format!("token service {realm}"), || match &creds {
            Some(Credentials::IdentityToken(t)) => self.agent.post(realm.as_str()).send_form([
                ("grant_type", "refresh_token"),
                ("refresh_token", t.expose()),
                ("service", service.as_str()),
                ("scope", scope.as_str()),
                ("client_id", "clip"),
            ]),
            Some(c @ Credentials::Basic { .. }) => self
                .agent
                .get(&url)
                .header("Authorization", c.basic_header().expect("basic"))
                .call(),
            None => self.agent.get(&url).call(),
        })?;
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return Err(SourceError::Denied(if creds.is_some() {
                format!(
                    "the token service of {} rejected the login for {}: check the user name and password ({})",
                    self.reference.registry,
                    self.repo_name(),
                    self.login_hint()
                )
            } else {
                format!(
                    "the token service of {} denied anonymous access to {}; {}",
                    self.reference.registry,
                    self.repo_name(),
                    self.login_hint()
                )
            }));
        }
        if status != 200 {
            return Err(SourceError::Registry(format!(
                "the token service of {} answered HTTP {status} for {}",
                self.reference.registry,
                self.repo_name()
            )));
        }
        #[derive(serde::Deserialize)]
        struct TokenReply {
            #[serde(default)]
            token: String,
            #[serde(default)]
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let body = resp
            .into_body()
            .into_with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| unreachable_msg(&self.reference.registry, e, self.plain_http))?;
        let reply: TokenReply = serde_json::from_slice(&body).map_err(|_| {
            SourceError::Registry(format!(
                "the token service of {} sent an answer that is not token JSON",
                self.reference.registry
            ))
        })?;
        let token = if reply.token.is_empty() {
            reply.access_token
        } else {
            reply.token
        };
        if token.is_empty() {
            return Err(SourceError::Registry(format!(
                "the token service of {} sent no token",
                self.reference.registry
            )));
        }
        // Tokens live 60 s unless told otherwise; renew a little early.
        let life = Duration::from_secs(reply.expires_in.unwrap_or(60).max(10));
        let expires = Instant::now() + life - Duration::from_secs(5);
        Ok(AuthState::Bearer {
            token: Secret::new(token),
            expires,
            challenge: challenge.clone(),
        })
    }

    fn sleep_before_retry(&self, attempt: u32, retry_after: Option<&str>) {
        let backoff = self
            .backoff
            .saturating_mul(1 << attempt.min(8))
            .min(Duration::from_secs(4));
        let wait = retry_after
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(10)))
            .unwrap_or(backoff);
        std::thread::sleep(wait);
    }

    /// Run `call` with bounded retries on connection failures, 5xx and 429.
    fn with_retries(
        &self,
        what: &str,
        mut call: impl FnMut() -> Result<Response<Body>, ureq::Error>,
    ) -> Result<Response<Body>, SourceError> {
        let host = &self.reference.registry;
        let mut attempt = 0;
        loop {
            match call() {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if (status == 429 || status >= 500) && attempt < self.retries {
                        tracing::debug!(
                            "{what}: HTTP {status}, retrying ({}/{})",
                            attempt + 1,
                            self.retries
                        );
                        self.sleep_before_retry(attempt, header(&resp, "retry-after"));
                        attempt += 1;
                        continue;
                    }
                    if status == 429 {
                        return Err(SourceError::RateLimited(format!(
                            "registry {host} is rate-limiting requests for {} (HTTP 429 after {} tries); wait and retry, or log in for a higher limit ({})",
                            self.repo_name(),
                            attempt + 1,
                            self.login_hint()
                        )));
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    let transient = match &e {
                        ureq::Error::Io(io) => is_transient_io(io),
                        ureq::Error::Timeout(_)
                        | ureq::Error::ConnectionFailed
                        | ureq::Error::Protocol(_) => true,
                        _ => false,
                    };
                    if transient && attempt < self.retries {
                        tracing::debug!("{what}: {e}, retrying ({}/{})", attempt + 1, self.retries);
                        self.sleep_before_retry(attempt, None);
                        attempt += 1;
                        continue;
                    }
                    return Err(self.transport_error(what, e));
                }
            }
        }
    }

    fn transport_error(&self, what: &str, e: ureq::Error) -> SourceError {
        let host = &self.reference.registry;
        match e {
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                unreachable_msg(host, "connection refused", self.plain_http)
            }
            ureq::Error::HostNotFound => {
                unreachable_msg(host, "host not found (DNS)", self.plain_http)
            }
            // rustls reports certificate and handshake failures as InvalidData I/O errors.
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) => self.tls_error(e),
            ureq::Error::Io(io)
                if io.kind() == std::io::ErrorKind::InvalidData && !self.plain_http =>
            {
                self.tls_error(ureq::Error::Io(io))
            }
            ureq::Error::TooManyRedirects | ureq::Error::RedirectFailed => {
                SourceError::Registry(format!(
                    "{what}: the registry {host} redirected too often or to a bad location ({e})"
                ))
            }
            e => unreachable_msg(host, format!("{what}: {e}"), self.plain_http),
        }
    }

    fn tls_error(&self, e: ureq::Error) -> SourceError {
        let host = &self.reference.registry;
        SourceError::Unreachable(format!(
            "TLS with registry {host} failed ({e}); for a private CA set {ENV_CA_FILE}=ca.pem, for a plain-HTTP registry {ENV_PLAIN_HTTP}=1, to skip verification {ENV_INSECURE}=1"
        ))
    }

    /// GET `url` with authentication (answering one 401 per request) and retries.
    fn get(
        &self,
        url: &str,
        what: &str,
        headers: &[(&str, String)],
    ) -> Result<Response<Body>, SourceError> {
        let mut authenticated = false;
        loop {
            let authz = self.authorization()?;
            let resp = self.with_retries(what, || {
                let mut req = self.agent.get(url);
                for (k, v) in headers {
                    req = req.header(*k, v.as_str());
                }
                if let Some(a) = &authz {
                    req = req.header("Authorization", a.as_str());
                }
                req.call()
            })?;
            if resp.status().as_u16() == 401 && !authenticated {
                authenticated = true;
                self.authenticate(&resp)?;
                continue;
            }
            return Ok(resp);
        }
    }

    /// A one-line error for an unexpected status of a request about `what`.
    fn status_error(&self, resp: Response<Body>, what: &str, kind: &str) -> SourceError {
        let status = resp.status().as_u16();
        let codes = error_codes(resp);
        let repo = self.repo_name();
        let has = |c: &str| codes.iter().any(|x| x == c);
        match status {
            401 | 403 => SourceError::Denied(format!(
                "access to {repo} denied (HTTP {status}{}): the repository may not exist or needs a login; {}",
                if codes.is_empty() { String::new() } else { format!(", {}", codes.join(", ")) },
                self.login_hint()
            )),
            404 if has("NAME_UNKNOWN") => SourceError::NotFound(format!(
                "repository {repo} does not exist on the registry; check the image name"
            )),
            404 => SourceError::NotFound(format!("{repo} has no {kind} {what} (HTTP 404); the image is incomplete on the registry")),
            _ => SourceError::Registry(format!(
                "registry {} answered HTTP {status} for {kind} {what} of {repo}{}",
                self.reference.registry,
                if codes.is_empty() { String::new() } else { format!(" ({})", codes.join(", ")) }
            )),
        }
    }

    /// The answer of the place blob requests for `digest` were redirected to lately, asked
    /// directly; `None` (and forgotten) when there is none or it does not answer with the
    /// bytes, so that the caller asks the registry again.
    fn at_location(&self, digest: &str, headers: &[(&str, String)]) -> Option<Response<Body>> {
        let mut locations = self.locations.lock().unwrap_or_else(|p| p.into_inner());
        let location = match locations.get(digest) {
            Some((url, until)) if *until > Instant::now() => url.clone(),
            Some(_) => {
                locations.remove(digest);
                return None;
            }
            None => return None,
        };
        drop(locations);
        let mut req = self.agent.get(&location);
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let ok = req
            .call()
            .ok()
            .filter(|r| matches!(r.status().as_u16(), 200 | 206));
        if ok.is_none() {
            tracing::debug!(
                "blob {digest}: its redirect target stopped answering; asking the registry again"
            );
            self.locations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(digest);
        }
        ok
    }

    /// Remember where the registry redirected a successful request for blob `digest`.
    /// Only a redirect to another host is remembered: the request there carries no
    /// credentials (they are the registry's), as when ureq follows the redirect.
    fn remember_location(&self, digest: &str, url: &str, resp: &Response<Body>) {
        use ureq::ResponseExt;
        if !matches!(resp.status().as_u16(), 200 | 206) {
            return;
        }
        let to = resp.get_uri();
        let from_host = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split('/').next());
        if to.authority().map(|a| a.as_str()) == from_host {
            return;
        }
        let mut locations = self.locations.lock().unwrap_or_else(|p| p.into_inner());
        if locations.len() >= 1024 {
            locations.clear();
        }
        locations.insert(
            digest.to_string(),
            (to.to_string(), Instant::now() + LOCATION_TTL),
        );
    }

    /// Open the body of blob `digest` from byte `pos`, up to `end` (exclusive) if known.
    /// Returns the body positioned at `pos`, the end if the response told it, and whether
    /// the body itself ends there (a ranged answer; not a whole blob sent to a reader that
    /// stops early), so that reading it to that end returns the connection to the pool.
    fn open_blob(
        &self,
        digest: &str,
        pos: u64,
        end: Option<u64>,
    ) -> Result<(ureq::BodyReader<'static>, Option<u64>, bool), SourceError> {
        let url = format!(
            "{}/v2/{}/blobs/{digest}",
            self.base, self.reference.repository
        );
        let mut headers = Vec::new();
        match end {
            Some(e) => headers.push(("Range", format!("bytes={pos}-{}", e - 1))),
            None if pos > 0 => headers.push(("Range", format!("bytes={pos}-"))),
            None => {}
        }
        tracing::trace!(digest, pos, end, "blob range request");
        let resp = match self.at_location(digest, &headers) {
            Some(resp) => resp,
            None => {
                let resp = self.get(&url, &format!("blob {digest}"), &headers)?;
                self.remember_location(digest, &url, &resp);
                resp
            }
        };
        let status = resp.status().as_u16();
        let length = header(&resp, "content-length").and_then(|v| v.parse::<u64>().ok());
        match status {
            206 => {
                let cr = header(&resp, "content-range").unwrap_or("").to_string();
                // `bytes START-LAST/TOTAL`
                let parsed = cr.strip_prefix("bytes ").and_then(|r| {
                    let (range, total) = r.split_once('/')?;
                    let (a, b) = range.split_once('-')?;
                    Some((
                        a.parse::<u64>().ok()?,
                        b.parse::<u64>().ok()?,
                        total.parse::<u64>().ok(),
                    ))
                });
                let Some((_, last, _)) = parsed.filter(|&(a, _, _)| a == pos) else {
                    return Err(SourceError::Registry(format!(
                        "registry {} answered range {cr:?} when asked for blob {digest} from byte {pos}",
                        self.reference.registry
                    )));
                };
                let got_end = last + 1;
                let exact = end.is_none_or(|e| e >= got_end);
                let end = Some(end.map_or(got_end, |e| e.min(got_end)));
                Ok((resp.into_body().into_reader(), end, exact))
            }
            200 => {
                let mut body = resp.into_body().into_reader();
                if pos > 0 || end.is_some() {
                    tracing::debug!(
                        "registry {} ignored Range for blob {digest}; skipping {pos} bytes",
                        self.reference.registry
                    );
                }
                if pos > 0 {
                    let skipped = std::io::copy(&mut (&mut body).take(pos), &mut std::io::sink())
                        .map_err(|e| {
                        unreachable_msg(
                            &self.reference.registry,
                            format!("reading blob {digest}: {e}"),
                            self.plain_http,
                        )
                    })?;
                    if skipped < pos {
                        return Err(SourceError::Registry(format!(
                            "blob {digest} on {} ends at byte {skipped}, before the wanted byte {pos}",
                            self.reference.registry
                        )));
                    }
                }
                let exact = length.is_some_and(|l| end.is_none_or(|e| e >= l));
                let end = match (end, length) {
                    (Some(e), Some(l)) => Some(e.min(l)),
                    (Some(e), None) => Some(e),
                    (None, l) => l,
                };
                Ok((body, end, exact))
            }
            416 => Err(SourceError::Registry(format!(
                "registry {} says bytes {pos}.. are outside blob {digest} (HTTP 416)",
                self.reference.registry
            ))),
            _ => Err(self.status_error(resp, digest, "blob")),
        }
    }
}

impl RegistrySource {
    /// Open repository `reference` (its tag and digest are ignored here) with `opts`.
    pub fn open(
        reference: &Reference,
        opts: &RegistryOptions,
    ) -> Result<RegistrySource, SourceError> {
        let plain_http = opts.plain_http.unwrap_or_else(|| reference.is_loopback());
        let mut tls = ureq::tls::TlsConfig::builder().disable_verification(opts.insecure);
        if let Some(ca) = &opts.ca_file {
            let pem = std::fs::read(ca).map_err(|source| SourceError::Io {
                context: format!("reading the CA file {} ({ENV_CA_FILE})", ca.display()),
                source,
            })?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(SourceError::Registry(format!(
                    "the CA file {} ({ENV_CA_FILE}) holds no PEM certificate",
                    ca.display()
                )));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .user_agent(concat!("clip/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .max_idle_connections(32)
            .max_idle_connections_per_host(16)
            .tls_config(tls.build());
        if reference.is_loopback() {
            config = config.proxy(None);
        }
        let agent = ureq::Agent::new_with_config(config.build());
        let base = format!(
            "{}://{}",
            if plain_http { "http" } else { "https" },
            reference.api_host()
        );
        tracing::debug!("registry source {base}/v2/{}", reference.repository);
        Ok(RegistrySource {
            client: Arc::new(Client {
                reference: Reference {
                    tag: None,
                    digest: None,
                    ..reference.clone()
                },
                base,
                plain_http,
                agent,
                credentials: OnceLock::new(),
                preset_credentials: opts.credentials.clone(),
                auth: Mutex::new(AuthState::Anonymous),
                retries: opts.retries,
                backoff: opts.backoff,
                locations: Mutex::default(),
            }),
        })
    }

    /// Reopen the repository recorded by [`Source::describe`] (`registry://HOST/REPO` or
    /// `registry+http://HOST/REPO`); the recorded scheme wins over `opts.plain_http`.
    pub fn open_recorded(
        recorded: &str,
        opts: &RegistryOptions,
    ) -> Result<RegistrySource, SourceError> {
        let (plain, rest) = if let Some(r) = recorded.strip_prefix(RECORDED_HTTP) {
            (true, r)
        } else if let Some(r) = recorded.strip_prefix(RECORDED_HTTPS) {
            (false, r)
        } else {
            return Err(SourceError::Registry(format!(
                "{recorded:?} is not a recorded registry source"
            )));
        };
        let reference = Reference::parse(rest)?;
        RegistrySource::open(
            &reference,
            &RegistryOptions {
                plain_http: Some(plain),
                ..opts.clone()
            },
        )
    }

    /// The repository (without tag or digest).
    pub fn reference(&self) -> &Reference {
        &self.client.reference
    }

    /// Turn what [`Source::manifest`] was given into a tag or digest of this repository: a
    /// tag, a digest, empty (`latest`) or a full reference to this same repository.
    fn manifest_ref(&self, reference: &str) -> Result<String, SourceError> {
        if reference.is_empty() {
            return Ok("latest".into());
        }
        if reference.contains('/') {
            let r = Reference::parse(reference)?;
            if r.registry != self.client.reference.registry
                || r.repository != self.client.reference.repository
            {
                return Err(SourceError::Registry(format!(
                    "{reference} is not in the repository {}",
                    self.client.repo_name()
                )));
            }
            return Ok(r.manifest_reference());
        }
        if reference.starts_with("sha256:") && !reference::valid_digest(reference) {
            return Err(SourceError::Reference {
                reference: reference.into(),
                why: "malformed sha256 digest".into(),
            });
        }
        Ok(reference.to_string())
    }
}

impl RegistrySource {
    /// Tell an unknown repository from an unknown tag or digest (distribution answers
    /// `MANIFEST_UNKNOWN` for both) by listing the repository's tags.
    fn manifest_not_found(&self, resp: Response<Body>, want: &str) -> SourceError {
        let c = &self.client;
        let repo = c.repo_name();
        if error_codes(resp).iter().any(|x| x == "NAME_UNKNOWN") {
            return SourceError::NotFound(format!(
                "repository {repo} does not exist on the registry; check the image name"
            ));
        }
        let url = format!("{}/v2/{}/tags/list?n=20", c.base, c.reference.repository);
        #[derive(serde::Deserialize)]
        struct Tags {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let tags = match c.get(&url, "tag list", &[]) {
            Ok(r) if r.status().as_u16() == 404 => {
                return SourceError::NotFound(format!(
                    "repository {repo} does not exist on the registry; check the image name"
                ))
            }
            Ok(r) if r.status().as_u16() == 200 => r
                .into_body()
                .into_with_config()
                .limit(1 << 20)
                .read_to_vec()
                .ok()
                .and_then(|b| serde_json::from_slice::<Tags>(&b).ok())
                .and_then(|t| t.tags),
            _ => None,
        };
        let known = match tags {
            Some(t) if !t.is_empty() => format!(" (some tags it has: {})", t.join(", ")),
            _ => String::new(),
        };
        if want.starts_with("sha256:") {
            SourceError::NotFound(format!(
                "{repo} has no manifest {want}; check the digest{known}"
            ))
        } else {
            SourceError::NotFound(format!(
                "{repo} has no tag {want:?} (unknown tag); check the tag{known}"
            ))
        }
    }
}

impl Source for RegistrySource {
    fn describe(&self) -> String {
        let r = &self.client.reference;
        format!(
            "{}{}/{}",
            if self.client.plain_http {
                RECORDED_HTTP
            } else {
                RECORDED_HTTPS
            },
            r.registry,
            r.repository
        )
    }

    fn manifest(&self, reference: &str) -> Result<(String, Vec<u8>, String), SourceError> {
        let c = &self.client;
        let want = self.manifest_ref(reference)?;
        let url = format!("{}/v2/{}/manifests/{want}", c.base, c.reference.repository);
        let resp = c.get(
            &url,
            &format!("manifest {want}"),
            &[("Accept", ACCEPT_MANIFESTS.to_string())],
        )?;
        if resp.status().as_u16() == 404 {
            return Err(self.manifest_not_found(resp, &want));
        }
        if resp.status().as_u16() != 200 {
            return Err(c.status_error(resp, &want, "manifest"));
        }
        let media_type = header(&resp, "content-type")
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .filter(|m| m.starts_with("application/vnd."))
            .unwrap_or_default();
        let claimed = header(&resp, "docker-content-digest").map(str::to_string);
        let bytes = resp
            .into_body()
            .into_with_config()
            .limit(MANIFEST_LIMIT)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => SourceError::BadImage(format!(
                    "manifest {want} of {} is larger than {MANIFEST_LIMIT} bytes",
                    c.repo_name()
                )),
                e => c.transport_error(&format!("reading manifest {want}"), e),
            })?;
        let actual = crate::oci::digest_of(&bytes);
        let expected = if want.starts_with("sha256:") {
            Some(want.clone())
        } else {
            claimed.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(expected) = expected {
            if expected != actual {
                return Err(SourceError::DigestMismatch {
                    what: format!("manifest of {}", c.repo_name()),
                    digest: expected,
                    actual,
                });
            }
        }
        tracing::debug!(
            "manifest {want} of {}: {media_type} {actual}",
            c.repo_name()
        );
        Ok((media_type, bytes, actual))
    }

    fn blob(
        &self,
        digest: &str,
        start: u64,
        end: Option<u64>,
    ) -> Result<Box<dyn Read + Send>, SourceError> {
        if !reference::valid_digest(digest) {
            return Err(SourceError::BadImage(format!(
                "malformed blob digest {digest:?}"
            )));
        }
        if end.is_some_and(|e| e <= start) {
            return Ok(Box::new(std::io::empty()));
        }
        let (body, known_end, exact) = self.client.open_blob(digest, start, end)?;
        Ok(Box::new(BlobReader {
            client: self.client.clone(),
            digest: digest.to_string(),
            pos: start,
            end: known_end,
            segment: None,
            body: Some(body),
            body_end: known_end.filter(|_| exact),
            failures: 0,
            resumes: 0,
        }))
    }

    /// Growing ranges: `start..expect_end` first, then each next range twice as long (up to
    /// 64 MiB), so a reader that stops early has not made the registry send the rest.
    fn blob_from(
        &self,
        digest: &str,
        start: u64,
        expect_end: u64,
        size: u64,
    ) -> Result<Box<dyn Read + Send>, SourceError> {
        if !reference::valid_digest(digest) {
            return Err(SourceError::BadImage(format!(
                "malformed blob digest {digest:?}"
            )));
        }
        let first_end = expect_end.clamp(start + 1, size.max(start + 1));
        Ok(Box::new(BlobReader {
            client: self.client.clone(),
            digest: digest.to_string(),
            pos: start,
            end: Some(size),
            segment: Some(Segment {
                end: first_end,
                next_len: (first_end - start).max(MIN_SEGMENT) * 2,
            }),
            body: None,
            body_end: None,
            failures: 0,
            resumes: 0,
        }))
    }
}

/// Smallest follow-up range of [`RegistrySource::blob_from`].
const MIN_SEGMENT: u64 = 256 << 10;
/// Largest follow-up range.
const MAX_SEGMENT: u64 = 64 << 20;

/// The range a segmented reader is in: it requests up to `end`, then `next_len` more.
struct Segment {
    end: u64,
    next_len: u64,
}

/// A blob body that survives interruptions: on a read error or an early end it asks for
/// the remaining range again (at most `retries` times in a row without progress, and
/// `8 × retries` times in all). With a `segment`, it asks for growing ranges instead of
/// the rest of the blob at once.
struct BlobReader {
    client: Arc<Client>,
    digest: String,
    pos: u64,
    end: Option<u64>,
    segment: Option<Segment>,
    body: Option<ureq::BodyReader<'static>>,
    /// Where the current body ends, when reading it to there returns its connection to
    /// the agent's pool (ureq reuses a connection only after a read sees the body's end).
    body_end: Option<u64>,
    /// Interruptions since the last progress.
    failures: u32,
    /// Interruptions in all.
    resumes: u32,
}

impl BlobReader {
    fn interrupted(&mut self, why: String) -> std::io::Result<()> {
        self.body = None;
        self.resumes += 1;
        if self.failures >= self.client.retries || self.resumes > self.client.retries * 8 {
            return Err(std::io::Error::other(format!(
                "blob {} from {}: {why} at byte {}, and resuming failed ({} tries in a row, {} in all); is the registry or the network unstable?",
                self.digest,
                self.client.reference.registry,
                self.pos,
                self.failures,
                self.resumes
            )));
        }
        tracing::debug!("blob {}: {why} at byte {}; resuming", self.digest, self.pos);
        self.client.sleep_before_retry(self.failures, None);
        self.failures += 1;
        Ok(())
    }
}

/// A body with at most this much left is read to its end when it is dropped, so that its
/// connection goes back to the pool instead of being closed.
const DRAIN_MAX: u64 = 64 << 10;

impl BlobReader {
    /// Read the current body to its end (at most `DRAIN_MAX` bytes) and let it go: ureq
    /// returns the connection to the agent's pool when a read sees the end of the body.
    fn release_body(&mut self) {
        let Some(mut body) = self.body.take() else {
            return;
        };
        let Some(left) = self.body_end.take().map(|e| e.saturating_sub(self.pos)) else {
            return;
        };
        if left <= DRAIN_MAX {
            let _ = std::io::copy(&mut (&mut body).take(left + 1), &mut std::io::sink());
        }
    }
}

impl Drop for BlobReader {
    fn drop(&mut self) {
        self.release_body();
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let want = match self.end {
                Some(end) if self.pos >= end => return Ok(0),
                Some(end) => buf
                    .len()
                    .min((end - self.pos).min(usize::MAX as u64) as usize),
                None => buf.len(),
            };
            if want == 0 {
                return Ok(0);
            }
            if let Some(seg) = &mut self.segment {
                if self.pos >= seg.end {
                    // This range is used up: the next one, twice as long.
                    self.body = None;
                    seg.end = (self.pos + seg.next_len).min(self.end.unwrap_or(u64::MAX));
                    seg.next_len = (seg.next_len * 2).min(MAX_SEGMENT);
                }
            }
            let want = match &self.segment {
                Some(seg) => want.min((seg.end - self.pos).min(usize::MAX as u64) as usize),
                None => want,
            };
            let request_end = self.segment.as_ref().map(|s| s.end).or(self.end);
            let body = match &mut self.body {
                Some(b) => b,
                None => match self.client.open_blob(&self.digest, self.pos, request_end) {
                    Ok((b, end, exact)) => {
                        if self.end.is_none() {
                            self.end = end;
                        }
                        if let (Some(seg), Some(got)) = (&mut self.segment, end) {
                            seg.end = seg.end.min(got);
                        }
                        self.body_end = end.filter(|_| exact);
                        self.body.insert(b)
                    }
                    Err(e @ (SourceError::Unreachable(_) | SourceError::Io { .. })) => {
                        self.interrupted(e.to_string())?;
                        continue;
                    }
                    Err(e) => return Err(std::io::Error::other(e)),
                },
            };
            match body.read(&mut buf[..want]) {
                Ok(0) if self.end.is_none() => return Ok(0),
                Ok(0) if self.segment.as_ref().is_some_and(|s| self.pos >= s.end) => continue,
                Ok(0) => self.interrupted("the connection ended early".into())?,
                Ok(n) => {
                    self.pos += n as u64;
                    self.failures = 0;
                    if self.body_end == Some(self.pos) {
                        self.release_body();
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => self.interrupted(e.to_string())?,
            }
        }
    }
}
