//! TLS for the gRPC ports (rustls through tonic). Files are read once at start-up.

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::TlsSettings;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert_path and tls.key_path must be set together (cert_path = {cert:?}, key_path = {key:?})")]
    Incomplete { cert: String, key: String },
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: String, source: std::io::Error },
    #[error("{what} {path} holds no PEM block")]
    NotPem { what: &'static str, path: String },
}

fn read_pem(what: &'static str, path: &str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(Path::new(path)).map_err(|source| TlsError::Read { what, path: path.to_string(), source })?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(TlsError::NotPem { what, path: path.to_string() });
    }
    Ok(bytes)
}

/// The server TLS config, or None for plaintext. `require_client_cert` asks for client
/// certificates signed by `tls.client_ca_path` (used on the admin port when that path is set).
pub fn server_config(settings: &TlsSettings, require_client_cert: bool) -> Result<Option<ServerTlsConfig>, TlsError> {
    match (settings.cert_path.is_empty(), settings.key_path.is_empty()) {
        (true, true) => return Ok(None),
        (false, false) => {}
        _ => return Err(TlsError::Incomplete { cert: settings.cert_path.clone(), key: settings.key_path.clone() }),
    }
    let cert = read_pem("TLS certificate", &settings.cert_path)?;
    let key = read_pem("TLS private key", &settings.key_path)?;
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if require_client_cert && !settings.client_ca_path.is_empty() {
        let ca = read_pem("client CA bundle", &settings.client_ca_path)?;
        config = config.client_ca_root(Certificate::from_pem(ca));
    }
    Ok(Some(config))
}
