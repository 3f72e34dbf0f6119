//! The agent's client of the hub's device API: postcard bodies, every request but enrollment
//! signed with the device key ([`outpost_protocol::auth`]), over HTTPS with the configured CA.

use std::io::Read;

use outpost_protocol::auth::{
    RequestToSign, HEADER_DEVICE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use outpost_protocol::device::{DeviceId, EnrollRequest, EnrollResponse, ErrorResponse};
use outpost_protocol::{sha256, DecodeError, Message, SecretKey, Sha256};
use ureq::tls::{PemItem, RootCerts, TlsConfig};
use ureq::Agent;

use crate::config::Config;

const CONTENT_TYPE: &str = "application/x-outpost-postcard";

/// The device's identity: its id at the hub and its private key.
#[derive(Debug)]
pub struct DeviceIdentity {
    pub id: DeviceId,
    pub key: SecretKey,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("cannot reach the hub at {url}: {message}")]
    Transport { url: String, message: String },
    #[error("hub refused {path} with {status}: {message}")]
    Refused {
        path: String,
        status: u16,
        message: String,
    },
    #[error("hub answered {path} with an undecodable body: {0}", path = .1)]
    Decode(#[source] DecodeError, String),
    /// The hub answered in a wire version this agent does not speak.
    #[error("hub answered {path}: {message}")]
    WireVersion { path: String, message: String },
    #[error("cannot read the CA bundle: {0}")]
    Ca(String),
}

impl HubError {
    /// True when the hub refused the request's authentication (401): a signed time outside its
    /// skew window, an unknown device, a replay.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, HubError::Refused { status: 401, .. })
    }

    /// True when retrying later may help (the hub was unreachable or overloaded).
    pub fn is_transient(&self) -> bool {
        match self {
            HubError::Transport { .. } => true,
            HubError::Refused { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            HubError::Decode(..) | HubError::WireVersion { .. } | HubError::Ca(_) => false,
        }
    }
}

#[derive(Debug)]
pub struct HubClient {
    agent: Agent,
    base_url: String,
    identity: Option<DeviceIdentity>,
}

/// A started artifact download.
pub struct Download {
    /// 206 when the hub honoured the range, 200 when it sends the whole file.
    pub status: u16,
    pub body: Box<dyn Read + Send>,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Download({})", self.status)
    }
}

impl HubClient {
    pub fn new(config: &Config, identity: Option<DeviceIdentity>) -> Result<HubClient, HubError> {
        let mut tls = TlsConfig::builder();
        if let Some(path) = &config.ca_bundle {
            let pem = std::fs::read(path)
                .map_err(|error| HubError::Ca(format!("{}: {error}", path.display())))?;
            let mut certificates = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                if let PemItem::Certificate(certificate) =
                    item.map_err(|error| HubError::Ca(format!("{}: {error}", path.display())))?
                {
                    certificates.push(certificate);
                }
            }
            if certificates.is_empty() {
                return Err(HubError::Ca(format!(
                    "{} holds no certificate",
                    path.display()
                )));
            }
            tls = tls.root_certs(RootCerts::new_with_certs(&certificates));
        }
        let agent = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(format!("outpost-agent/{}", env!("CARGO_PKG_VERSION")))
            .timeout_resolve(Some(config.connect_timeout))
            .timeout_connect(Some(config.connect_timeout))
            .timeout_per_read(Some(config.read_timeout))
            .timeout_per_write(Some(config.read_timeout))
            .tls_config(tls.build())
            .build()
            .new_agent();
        Ok(HubClient {
            agent,
            base_url: config.hub_url.clone(),
            identity,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn transport(&self, error: ureq::Error) -> HubError {
        HubError::Transport {
            url: self.base_url.clone(),
            message: error.to_string(),
        }
    }

    /// The signing headers for one request.
    fn sign(&self, method: &str, path: &str, body: &[u8]) -> Vec<(&'static str, String)> {
        let Some(identity) = &self.identity else {
            return Vec::new();
        };
        let mut nonce = [0u8; 16];
        // Without randomness the nonce is still unique per process thanks to the timestamp and
        // body; a failed read only weakens replay detection to the hub's timestamp window.
        let _ = getrandom::getrandom(&mut nonce);
        let timestamp = crate::unix_now();
        let signature = RequestToSign {
            method,
            path_and_query: path,
            body_sha256: sha256(body),
            timestamp,
            nonce,
        }
        .sign(&identity.key);
        vec![
            (HEADER_DEVICE, identity.id.to_hex()),
            (HEADER_TIMESTAMP, timestamp.to_string()),
            (HEADER_NONCE, hex::encode(nonce)),
            (HEADER_SIGNATURE, hex::encode(signature.0)),
        ]
    }

    fn post_frame(
        &self,
        path: &str,
        frame: &[u8],
        max_response: usize,
    ) -> Result<(u16, Vec<u8>), HubError> {
        let mut request = self
            .agent
            .post(format!("{}{path}", self.base_url))
            .header("Content-Type", CONTENT_TYPE);
        for (name, value) in self.sign("POST", path, frame) {
            request = request.header(name, value);
        }
        let response = request.send(frame).map_err(|error| self.transport(error))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .into_with_config()
            .limit(max_response as u64)
            .read_to_vec()
            .map_err(|error| self.transport(error))?;
        Ok((status, body))
    }

    fn refused(path: &str, status: u16, body: &[u8]) -> HubError {
        let message = outpost_protocol::decode::<ErrorResponse>(body)
            .map(|error| error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
        HubError::Refused {
            path: path.to_owned(),
            status,
            message,
        }
    }

    /// Sends `message` to `path` and decodes the answer as `R`.
    pub fn call<M: Message, R: Message>(&self, path: &str, message: &M) -> Result<R, HubError> {
        let frame = outpost_protocol::encode(message).map_err(|error| HubError::Refused {
            path: path.to_owned(),
            status: 0,
            message: error.to_string(),
        })?;
        let (status, body) =
            self.post_frame(path, &frame, R::MAX_FRAME.max(ErrorResponse::MAX_FRAME))?;
        if status != 200 {
            return Err(Self::refused(path, status, &body));
        }
        outpost_protocol::decode(&body).map_err(|error| Self::undecodable(path, error))
    }

    /// A body that does not decode; one in another wire version says which side to upgrade.
    fn undecodable(path: &str, error: DecodeError) -> HubError {
        match error.reason {
            outpost_protocol::DecodeReason::UnsupportedVersion { found } => HubError::WireVersion {
                path: path.to_owned(),
                message: outpost_protocol::envelope::version_mismatch("agent", "hub", found),
            },
            _ => HubError::Decode(error, path.to_owned()),
        }
    }

    /// Sends `message` to `path`, expecting no answer body.
    pub fn send<M: Message>(&self, path: &str, message: &M) -> Result<(), HubError> {
        let frame = outpost_protocol::encode(message).map_err(|error| HubError::Refused {
            path: path.to_owned(),
            status: 0,
            message: error.to_string(),
        })?;
        let (status, body) = self.post_frame(path, &frame, ErrorResponse::MAX_FRAME)?;
        if !(200..300).contains(&status) {
            return Err(Self::refused(path, status, &body));
        }
        Ok(())
    }

    /// Enrolls with a token; needs no identity.
    pub fn enroll(&self, request: &EnrollRequest) -> Result<EnrollResponse, HubError> {
        self.call("/device/v1/enroll", request)
    }

    /// Starts downloading an artifact from byte `offset`.
    pub fn download(&self, digest: &Sha256, offset: u64) -> Result<Download, HubError> {
        let path = format!("/device/v1/artifacts/{}", digest.to_hex());
        let mut request = self.agent.get(format!("{}{path}", self.base_url));
        if offset > 0 {
            request = request.header("Range", format!("bytes={offset}-"));
        }
        for (name, value) in self.sign("GET", &path, &[]) {
            request = request.header(name, value);
        }
        let response = request.call().map_err(|error| self.transport(error))?;
        let status = response.status().as_u16();
        if status != 200 && status != 206 {
            let body = response
                .into_body()
                .into_with_config()
                .limit(ErrorResponse::MAX_FRAME as u64)
                .read_to_vec()
                .unwrap_or_default();
            return Err(Self::refused(&path, status, &body));
        }
        Ok(Download {
            status,
            body: Box::new(response.into_body().into_reader()),
        })
    }
}
