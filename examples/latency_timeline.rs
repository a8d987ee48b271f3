//! A closed-loop HTTP/1.1-over-TLS load generator that keeps every request's
//! start time, so a run's latency can be read over time: how long the
//! connection storm at the start lasts and what it does to p99, which a
//! single wrk summary cannot tell apart from the steady state.
//!
//! ```text
//! latency_timeline https://127.0.0.1:23473/ -c 256 -d 10s -H 'Authorization: Bearer glsa_…' [-b 250ms]
//! ```
//!
//! Prints p50/p99/max per time bucket (by request start), then the whole
//! run, then the run without its first second. Certificates are not checked
//! (the bench's is self-signed) but handshake signatures are, so the client
//! pays for a handshake what wrk pays. `bench/run.sh` uses it for its
//! steady-state pass.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::upstream::AcceptAnyCertificate;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

struct Args {
    host: String,
    port: u16,
    path: String,
    connections: usize,
    duration: Duration,
    bucket: Duration,
    headers: Vec<String>,
}

fn duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("not a duration: {text}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        _ => Err(format!("not a duration: {text} (use ms or s)")),
    }
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut url = None;
    let (mut connections, mut dur, mut bucket, mut headers) = (
        64,
        Duration::from_secs(10),
        Duration::from_millis(250),
        Vec::new(),
    );
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "-c" => connections = value()?.parse().map_err(|_| "-c takes a number".to_owned())?,
            "-d" => dur = duration(&value()?)?,
            "-b" => bucket = duration(&value()?)?,
            "-H" => headers.push(value()?),
            other if url.is_none() => url = Some(other.to_owned()),
            other => return Err(format!("unexpected argument {other}")),
        }
    }
    if connections == 0 || dur.is_zero() || bucket.is_zero() {
        return Err("-c, -d and -b must be above zero".into());
    }
    let url =
        url.ok_or("usage: latency_timeline https://host:port/path [-c N] [-d 10s] [-b 250ms] [-H 'K: V']")?;
    let rest = url.strip_prefix("https://").ok_or("only https:// URLs")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "443"));
    Ok(Args {
        host: host.to_owned(),
        port: port.parse().map_err(|_| format!("bad port in {url}"))?,
        path: if path.is_empty() {
            "/".to_owned()
        } else {
            path.to_owned()
        },
        connections,
        duration: dur,
        bucket,
        headers,
    })
}

/// (start since the run began, latency), both in microseconds.
type Sample = (u64, u64);

async fn connection(
    args: Arc<Args>,
    connector: TlsConnector,
    request: Arc<Vec<u8>>,
    began: Instant,
) -> Result<Vec<Sample>, String> {
    let tcp = TcpStream::connect((args.host.as_str(), args.port))
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let name = ServerName::try_from(args.host.clone()).map_err(|e| e.to_string())?;
    let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let mut samples = Vec::with_capacity(8192);
    let mut buf = Vec::with_capacity(16 * 1024);
    let deadline = began + args.duration;
    while Instant::now() < deadline {
        let start = Instant::now();
        tls.write_all(&request).await.map_err(|e| e.to_string())?;
        buf.clear();
        loop {
            let mut chunk = [0u8; 8192];
            let n = tls.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if response_complete(&buf)? {
                break;
            }
        }
        samples.push((
            start.duration_since(began).as_micros() as u64,
            start.elapsed().as_micros() as u64,
        ));
    }
    Ok(samples)
}

/// Whether `buf` holds a whole answer (Content-Length framing only).
fn response_complete(buf: &[u8]) -> Result<bool, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(false);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "non-UTF-8 head")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("answer: {}", head.lines().next().unwrap_or("")));
    }
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .ok_or("no Content-Length")?;
    Ok(buf.len() >= end + 4 + length)
}

fn quantile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// One line of the table; a closed pipe (`| head`) ends the output quietly.
fn summary(out: &mut impl Write, label: &str, latencies: &mut [u64], seconds: f64) {
    latencies.sort_unstable();
    let _ = writeln!(
        out,
        "{label:>14} {:>8} {:>9.0} {:>8.2} {:>8.2} {:>8.2}",
        latencies.len(),
        latencies.len() as f64 / seconds,
        quantile(latencies, 0.5),
        quantile(latencies, 0.99),
        latencies.last().copied().unwrap_or(0) as f64 / 1000.0
    );
}

fn main() {
    if let Err(e) = run() {
        eprintln!("latency_timeline: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let args = Arc::new(parse_args()?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate::new(provider)))
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let mut head = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\n",
        args.path, args.host, args.port
    );
    for h in &args.headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let request = Arc::new(head.into_bytes());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let samples: Vec<Sample> = runtime.block_on(async {
        let began = Instant::now();
        let tasks: Vec<_> = (0..args.connections)
            .map(|_| {
                tokio::spawn(connection(
                    args.clone(),
                    connector.clone(),
                    request.clone(),
                    began,
                ))
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            match task.await {
                Ok(Ok(s)) => all.extend(s),
                Ok(Err(e)) => eprintln!("connection failed: {e}"),
                Err(e) => eprintln!("connection task failed: {e}"),
            }
        }
        all
    });
    let bucket = args.bucket.as_micros() as u64;
    let buckets = args.duration.as_micros().div_ceil(u128::from(bucket)) as usize;
    let mut by_bucket = vec![Vec::new(); buckets.max(1)];
    for &(start, latency) in &samples {
        by_bucket[((start / bucket) as usize).min(buckets - 1)].push(latency);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:>14} {:>8} {:>9} {:>8} {:>8} {:>8}",
        "from (ms)", "requests", "req/s", "p50 ms", "p99 ms", "max ms"
    );
    let per_bucket = args.bucket.as_secs_f64();
    for (i, lat) in by_bucket.iter_mut().enumerate() {
        summary(
            &mut out,
            &format!("{}", i as u64 * bucket / 1000),
            lat,
            per_bucket,
        );
    }
    let secs = args.duration.as_secs_f64();
    let mut all: Vec<u64> = samples.iter().map(|s| s.1).collect();
    summary(&mut out, "whole run", &mut all, secs);
    let mut steady: Vec<u64> = samples.iter().filter(|s| s.0 >= 1_000_000).map(|s| s.1).collect();
    summary(&mut out, "after 1 s", &mut steady, (secs - 1.0).max(f64::EPSILON));
    if samples.is_empty() {
        return Err("no request completed".into());
    }
    Ok(())
}
