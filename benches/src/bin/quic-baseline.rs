//! `quic-baseline`: the bare QUIC stream that relsync's bulk push is compared with.
//!
//! Same quinn version, same TLS 1.3 handshake with pinned keys, same transport tuning
//! ([`NetConfig::default`]) and socket buffers as relsyncd and `relsync push`; the only difference
//! is that nothing but bytes goes over the stream: no manifest, no hashing, no compression, no
//! file system. The client sends `--bytes` of pseudo-random data on one unidirectional stream
//! and the server answers with one byte once it has read them all, so the client's clock covers
//! the whole transfer.
//!
//! ```text
//! quic-baseline server --listen ADDR --key K --cert C --authorize FP
//! quic-baseline client --connect ADDR --key K --cert C --pin FP --bytes N
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sync_server::net::{self, NetConfig};
use sync_server::tls::{AuthorizedClientVerifier, Fingerprint, Identity, PinnedServerVerifier};

#[derive(Parser)]
#[command(about = "bare QUIC stream throughput, tuned like relsync")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept connections and read each one's stream to the end; runs until killed.
    Server {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        /// Fingerprint of the client key to accept.
        #[arg(long)]
        authorize: String,
    },
    /// Send `--bytes` on one stream and print the seconds it took and the rate.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        /// Fingerprint of the server key.
        #[arg(long)]
        pin: String,
        #[arg(long)]
        bytes: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        match cli.command {
            Cmd::Server {
                listen,
                key,
                cert,
                authorize,
            } => server(listen, &key, &cert, &authorize).await,
            Cmd::Client {
                connect,
                key,
                cert,
                pin,
                bytes,
            } => client(connect, &key, &cert, &pin, bytes).await,
        }
    })
}

fn fingerprint(text: &str) -> Result<Fingerprint> {
    text.parse()
        .with_context(|| format!("reading fingerprint {text}"))
}

async fn server(listen: SocketAddr, key: &Path, cert: &Path, authorize: &str) -> Result<()> {
    let identity = Identity::load(key, cert).context("loading the server key")?;
    let verifier = Arc::new(AuthorizedClientVerifier::new([fingerprint(authorize)?]));
    let endpoint = net::server_endpoint(listen, &identity, verifier, &NetConfig::default())
        .with_context(|| format!("listening on {listen}"))?;
    eprintln!("quic-baseline: listening on {listen}");
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            if let Err(e) = serve_one(incoming).await {
                eprintln!("quic-baseline: connection failed: {e:#}");
            }
        });
    }
    Ok(())
}

async fn serve_one(incoming: quinn::Incoming) -> Result<()> {
    let conn = incoming.await.context("handshake")?;
    let mut recv = conn.accept_uni().await.context("accepting the stream")?;
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while let Some(n) = recv.read(&mut buf).await.context("reading the stream")? {
        total += n as u64;
    }
    let mut ack = conn.open_uni().await.context("opening the answer stream")?;
    ack.write_all(&total.to_le_bytes()).await?;
    ack.finish()?;
    conn.closed().await;
    Ok(())
}

async fn client(addr: SocketAddr, key: &Path, cert: &Path, pin: &str, bytes: u64) -> Result<()> {
    let identity = Identity::load(key, cert).context("loading the client key")?;
    let host_port = addr.to_string();
    let verifier = Arc::new(PinnedServerVerifier::new(
        &host_port,
        Some(fingerprint(pin)?),
    )?);
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let net_config = NetConfig::default();
    let endpoint = net::client_endpoint(bind, &net_config)?;
    // Incompressible data, made before the clock starts (a PRNG, not the file system).
    let mut block = vec![0u8; 1 << 20];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let block = bytes::Bytes::from(block);
    let started = Instant::now();
    let conn = net::connect(
        &endpoint,
        addr,
        &addr.ip().to_string(),
        verifier,
        &identity,
        &net_config,
    )
    .await
    .with_context(|| format!("connecting to {addr}"))?;
    let mut send = conn.open_uni().await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        send.write_chunk(block.slice(..n)).await?;
        left -= n as u64;
    }
    send.finish()?;
    let mut ack = conn.accept_uni().await?;
    let mut got = [0u8; 8];
    ack.read_exact(&mut got).await?;
    let secs = started.elapsed().as_secs_f64();
    let received = u64::from_le_bytes(got);
    if received != bytes {
        bail!("the server read {received} bytes of the {bytes} sent");
    }
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    println!(
        "{{\"bytes\": {bytes}, \"seconds\": {secs:.6}, \"mb_per_s\": {:.1}}}",
        bytes as f64 / secs / 1e6
    );
    Ok(())
}
