//! Just enough HTTP/1.1 for health checks against a local listener: URL parsing, the request
//! bytes, an incremental response parser (Content-Length, chunked, or until close) with bounded
//! sizes, and the verdict on a response.

use std::fmt::Write as _;

use super::HealthCheck;

/// Largest status line + headers accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest body accepted (health pages are small; anything bigger is refused, not buffered).
pub const MAX_BODY: usize = 1024 * 1024;

/// An `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, String> {
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => {
                return Err(
                    "https is not supported; check the app through its local http listener".into(),
                )
            }
            _ => return Err(format!("{url:?} is not an http:// URL")),
        };
        if url.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(format!("{url:?} contains spaces or control characters"));
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let path = path.split('#').next().unwrap_or("/").to_owned();
        if authority.contains('@') {
            return Err(format!("{url:?}: user information is not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed [ in the host"))?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(format!("{url:?}: bad host")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{url:?}: bad port"))?,
        };
        Ok(Url {
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// `host` or `host:port` as a `Host` header value.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// The bytes of a GET request.
pub fn get_request(path: &str, host_header: &str, keep_alive: bool) -> Vec<u8> {
    let mut s = String::new();
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: relsync\r\nAccept: */*\r\n"
    );
    if !keep_alive {
        s.push_str("Connection: close\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// False when the server said `Connection: close` (or spoke HTTP/1.0 without keep-alive).
    pub keep_alive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    #[error("bad status line {0:?}")]
    StatusLine(String),
    #[error("response headers larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("response body larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("bad header line {0:?}")]
    Header(String),
    #[error("bad chunked encoding")]
    Chunk,
    #[error("connection closed before the response was complete")]
    Truncated,
}

fn find_crlf2(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Parses one response from the start of `buf`. `Ok(None)`: more bytes are needed (unless `eof`,
/// then the response is truncated). `Ok(Some((response, consumed)))` otherwise.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(Response, usize)>, HttpError> {
    let Some(head_len) = find_crlf2(buf) else {
        if buf.len() > MAX_HEAD {
            return Err(HttpError::HeadTooLarge);
        }
        return if eof {
            Err(HttpError::Truncated)
        } else {
            Ok(None)
        };
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let head = String::from_utf8_lossy(&buf[..head_len]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..=999).contains(s) && version.starts_with("HTTP/1."))
        .ok_or_else(|| HttpError::StatusLine(status_line.chars().take(80).collect()))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut keep_alive = version == "HTTP/1.1";
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| HttpError::Header(line.chars().take(80).collect()))?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                let n: usize = value
                    .parse()
                    .map_err(|_| HttpError::Header(line.chars().take(80).collect()))?;
                if n > MAX_BODY {
                    return Err(HttpError::BodyTooLarge);
                }
                length = Some(n);
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().ends_with("chunked"),
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    keep_alive = false;
                } else if v.contains("keep-alive") {
                    keep_alive = true;
                }
            }
            _ => {}
        }
    }
    let start = head_len + 4;
    let rest = &buf[start..];
    let done = |body: Vec<u8>, used: usize| {
        Ok(Some((
            Response {
                status,
                body,
                keep_alive,
            },
            start + used,
        )))
    };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return done(Vec::new(), 0);
    }
    if chunked {
        return match dechunk(rest)? {
            Some((body, used)) => done(body, used),
            None if eof => Err(HttpError::Truncated),
            None => Ok(None),
        };
    }
    match length {
        Some(n) if rest.len() >= n => done(rest[..n].to_vec(), n),
        Some(_) if eof => Err(HttpError::Truncated),
        Some(_) => Ok(None),
        None if rest.len() > MAX_BODY => Err(HttpError::BodyTooLarge),
        None if eof => {
            keep_alive = false;
            Ok(Some((
                Response {
                    status,
                    body: rest.to_vec(),
                    keep_alive,
                },
                buf.len(),
            )))
        }
        None => Ok(None),
    }
}

/// Decodes a chunked body at the start of `buf`: `Ok(None)` when incomplete.
fn dechunk(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HttpError> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
            return if buf.len() - pos > 1024 {
                Err(HttpError::Chunk)
            } else {
                Ok(None)
            };
        };
        let line = std::str::from_utf8(&buf[pos..pos + eol]).map_err(|_| HttpError::Chunk)?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| HttpError::Chunk)?;
        if body.len().saturating_add(size) > MAX_BODY {
            return Err(HttpError::BodyTooLarge);
        }
        pos += eol + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(eol) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(HttpError::Chunk);
        }
        pos += size + 2;
    }
}

/// The start of a body, printable, for error messages.
pub fn snippet(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(160)
        .collect();
    text.trim().to_owned()
}

/// Whether `r` is what `check` expects; the error says what differed.
pub fn judge(check: &HealthCheck, r: &Response) -> Result<(), String> {
    if r.status != check.status {
        return Err(format!(
            "{} answered {} (expected {}): {:?}",
            check.url,
            r.status,
            check.status,
            snippet(&r.body)
        ));
    }
    if let Some(want) = &check.body_contains {
        let body = String::from_utf8_lossy(&r.body);
        if !body.contains(want.as_str()) {
            return Err(format!(
                "{} answered {} but the body does not contain {want:?}: {:?}",
                check.url,
                r.status,
                snippet(&r.body)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        /// URL, then host, port, path and Host header, or a piece of the error.
        type Case = (
            &'static str,
            Result<(&'static str, u16, &'static str, &'static str), &'static str>,
        );
        let table: &[Case] = &[
            ("http://127.0.0.1/", Ok(("127.0.0.1", 80, "/", "127.0.0.1"))),
            ("http://127.0.0.1", Ok(("127.0.0.1", 80, "/", "127.0.0.1"))),
            (
                "http://localhost:8080/health?x=1#frag",
                Ok(("localhost", 8080, "/health?x=1", "localhost:8080")),
            ),
            ("http://h:81?x", Ok(("h", 81, "/?x", "h:81"))),
            ("http://[::1]:8080/h", Ok(("::1", 8080, "/h", "[::1]:8080"))),
            ("https://x/", Err("https is not supported")),
            ("ftp://x/", Err("not an http:// URL")),
            ("127.0.0.1/health", Err("not an http:// URL")),
            ("http:///x", Err("no host")),
            ("http://h:0/", Err("bad port")),
            ("http://h:99999/", Err("bad port")),
            ("http://u@h/", Err("user information")),
            ("http://h/a b", Err("spaces")),
        ];
        for (text, want) in table {
            match (Url::parse(text), want) {
                (Ok(u), Ok((h, p, path, auth))) => {
                    assert_eq!(
                        (
                            u.host.as_str(),
                            u.port,
                            u.path.as_str(),
                            u.authority().as_str()
                        ),
                        (*h, *p, *path, *auth),
                        "{text}"
                    )
                }
                (Err(e), Err(w)) => assert!(e.contains(w), "{text}: {e}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn request_bytes() {
        assert_eq!(
            String::from_utf8(get_request("/h?x", "shop.example", false)).unwrap(),
            "GET /h?x HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: relsync\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        assert!(!String::from_utf8(get_request("/", "h", true))
            .unwrap()
            .contains("Connection"));
    }

    #[test]
    fn responses() {
        type Want = Result<Option<(u16, &'static str, bool, usize)>, HttpError>;
        let table: &[(&str, &[u8], bool, Want)] = &[
            (
                "content-length",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
                false,
                Ok(Some((200, "ok", true, 40))),
            ),
            (
                "content-length, incomplete",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok",
                false,
                Ok(None),
            ),
            (
                "content-length, truncated",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok",
                true,
                Err(HttpError::Truncated),
            ),
            (
                "chunked with extension and trailer",
                b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n",
                false,
                Ok(Some((500, "abcde", true, 81))),
            ),
            (
                "chunked, incomplete",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
                false,
                Ok(None),
            ),
            (
                "chunked, bad size",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                false,
                Err(HttpError::Chunk),
            ),
            (
                "until close",
                b"HTTP/1.0 200 OK\r\n\r\nall of it",
                true,
                Ok(Some((200, "all of it", false, 28))),
            ),
            ("until close, open", b"HTTP/1.0 200 OK\r\n\r\nall", false, Ok(None)),
            (
                "connection close",
                b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
                false,
                Ok(Some((204, "", false, 46))),
            ),
            ("head incomplete", b"HTTP/1.1 200 OK\r\nCont", false, Ok(None)),
            (
                "garbage",
                b"SSH-2.0-OpenSSH\r\n\r\n",
                false,
                Err(HttpError::StatusLine("SSH-2.0-OpenSSH".into())),
            ),
            (
                "huge length",
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
                false,
                Err(HttpError::BodyTooLarge),
            ),
            (
                "bad header",
                b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
                false,
                Err(HttpError::Header("no colon".into())),
            ),
        ];
        for (name, bytes, eof, want) in table {
            let got = parse_response(bytes, *eof).map(|o| {
                o.map(|(r, n)| {
                    (
                        r.status,
                        String::from_utf8(r.body).unwrap(),
                        r.keep_alive,
                        n,
                    )
                })
            });
            let want = want
                .clone()
                .map(|o| o.map(|(s, b, k, n)| (s, b.to_string(), k, n)));
            assert_eq!(got, want, "{name}");
        }
        let big = vec![b'x'; MAX_HEAD + 10];
        assert_eq!(parse_response(&big, false), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn verdicts() {
        let check = |status, body: Option<&str>| HealthCheck {
            url: "http://127.0.0.1/h".into(),
            host: "127.0.0.1".into(),
            port: 80,
            path: "/h".into(),
            host_header: "127.0.0.1".into(),
            status,
            body_contains: body.map(str::to_owned),
            timeout: std::time::Duration::from_secs(1),
            interval: std::time::Duration::from_millis(10),
        };
        let resp = |status, body: &str| Response {
            status,
            body: body.as_bytes().to_vec(),
            keep_alive: false,
        };
        assert_eq!(judge(&check(200, Some("ok")), &resp(200, "all ok")), Ok(()));
        let e = judge(&check(200, None), &resp(502, "<h1>Bad\nGateway</h1>")).unwrap_err();
        assert!(e.contains("answered 502 (expected 200)"), "{e}");
        assert!(e.contains("Bad Gateway"), "{e}");
        let e = judge(&check(200, Some("ok")), &resp(200, "fail")).unwrap_err();
        assert!(e.contains("does not contain \"ok\""), "{e}");
    }
}
