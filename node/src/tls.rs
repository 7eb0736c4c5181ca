//! TLS, from PEM files named in the configuration.
//!
//! - Clients (`client.tls_cert`, `tls_key`): the gateway serves `wss://` with the node's
//!   certificate.
//! - Node-to-node sessions (`cluster.tls_cert`, `tls_key`, `tls_ca`): mutual TLS. Every node
//!   presents its certificate on both ends of a session, and each end checks the other's
//!   against the cluster's CA; a node dialing a peer also checks that the certificate names
//!   the address it dials (so certificates name the nodes' advertised hosts or IPs). The
//!   cookie still authenticates the session.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {detail}")]
    Read { what: String, path: String, detail: String },
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// The server and client sides of the cluster's TLS.
#[derive(Clone)]
pub struct ClusterTls {
    pub acceptor: TlsAcceptor,
    pub connector: TlsConnector,
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |detail: String| TlsError::Read { what: what.to_string(), path: path.display().to_string(), detail };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(read("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// A certificate chain and its key; `section` names the configuration section.
fn identity(
    section: &str,
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = certs(cert, &format!("the node certificate ({section}.tls_cert)"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Read {
        what: format!("the node key ({section}.tls_key)"),
        path: key.display().to_string(),
        detail: e.to_string(),
    })?;
    Ok((chain, key))
}

/// The acceptor for clients' `wss://` connections.
pub fn client_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let (chain, key) = identity("client", cert, key)?;
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("client.tls_cert/tls_key: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

impl ClusterTls {
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<ClusterTls, TlsError> {
        let (chain, key) = identity("cluster", cert, key)?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(ca, "the cluster CA (cluster.tls_ca)")? {
            roots.add(ca).map_err(|e| TlsError::Config(format!("cluster.tls_ca: {e}")))?;
        }
        let roots = Arc::new(roots);
        let peers = WebPkiClientVerifier::builder(roots.clone())
            .build()
            .map_err(|e| TlsError::Config(format!("cluster.tls_ca: {e}")))?;
        let server = rustls::ServerConfig::builder()
            .with_client_cert_verifier(peers)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError::Config(format!("cluster.tls_cert/tls_key: {e}")))?;
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("cluster.tls_cert/tls_key: {e}")))?;
        Ok(ClusterTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }
}

/// The name a peer's certificate must carry, from the address we dial (`host:port`).
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']);
    ServerName::try_from(host.to_string()).map_err(|e| TlsError::Config(format!("cannot verify {addr:?}: {e}")))
}
