//! HAProxy's PROXY protocol, versions 1 (text) and 2 (binary), as a listener behind a TCP
//! balancer receives it: the header is the very first bytes of the connection, before TLS
//! or HTTP, and names the client the balancer accepted. A connection without a valid one is
//! refused (HAProxy's `accept-proxy`, nginx's `listen ... proxy_protocol`).
//!
//! [`read_header`] consumes exactly the header's bytes: what follows stays in the socket for
//! rustls or hyper. It peeks, reads only the bytes the header spans, and peeks again; having
//! consumed everything pending, the next peek waits for new bytes instead of spinning.
//!
//! Reference: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// What a valid header says about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The balancer relays a client: `source` is the client, `destination` the address it
    /// connected to on the balancer.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The balancer speaks for itself (v2 LOCAL, its health checks) or relays something
    /// without a TCP address (v1 UNKNOWN, v2 AF_UNSPEC or AF_UNIX): the connection's own
    /// addresses stand.
    Local,
}

/// Why a connection's header was refused; its Display is a phrase a log line can carry.
#[derive(Debug)]
pub enum ProxyHeaderError {
    /// The first bytes are neither `PROXY ` nor the v2 signature (plain HTTP, TLS, garbage).
    NotProxy,
    /// Starts as v1 but breaks its grammar.
    MalformedV1(&'static str),
    /// Starts with the v2 signature but breaks its layout.
    MalformedV2(&'static str),
    /// The v2 signature with a version other than 2.
    UnsupportedVersion(u8),
    /// A v2 header announcing more than [`MAX_V2_PAYLOAD`] bytes of addresses and TLVs.
    V2TooLong(usize),
    /// The client closed the connection after `received` bytes, before the header ended.
    Closed {
        received: usize,
    },
    /// The whole header did not arrive within the time given.
    TimedOut(Duration),
    Io(io::Error),
}

impl fmt::Display for ProxyHeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotProxy => f.write_str("no PROXY protocol header"),
            Self::MalformedV1(why) => write!(f, "malformed PROXY v1 header: {why}"),
            Self::MalformedV2(why) => write!(f, "malformed PROXY v2 header: {why}"),
            Self::UnsupportedVersion(version) => {
                write!(f, "unsupported PROXY protocol version {version}")
            }
            Self::V2TooLong(len) => write!(
                f,
                "PROXY v2 header too long: {len} bytes of addresses and TLVs (at most {MAX_V2_PAYLOAD})"
            ),
            Self::Closed { received: 0 } => {
                f.write_str("connection closed before the PROXY header")
            }
            Self::Closed { received } => write!(
                f,
                "connection closed inside the PROXY header (after {received} bytes)"
            ),
            Self::TimedOut(within) => {
                write!(f, "timed out waiting for the PROXY header ({within:?})")
            }
            Self::Io(error) => write!(f, "reading the PROXY header: {error}"),
        }
    }
}

impl std::error::Error for ProxyHeaderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(error) => Some(error),
            _ => None,
        }
    }
}

impl From<io::Error> for ProxyHeaderError {
    fn from(error: io::Error) -> Self {
        Self::Io(error)
    }
}

/// The longest v1 header the spec allows, CRLF included.
pub const MAX_V1_LEN: usize = 107;
/// The most bytes of addresses and TLVs a v2 header may announce; more is refused, so a
/// client cannot make the listener hold a 64 KiB buffer per connection. HAProxy's own TLVs
/// (SSL, unique id) and the cloud balancers' (AWS, Azure, GCP) fit well within it.
pub const MAX_V2_PAYLOAD: usize = 2048;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED_LEN: usize = 16;

/// Reads the PROXY header that opens `stream`, consuming exactly its bytes, all within
/// `timeout`.
pub async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<ProxyHeader, ProxyHeaderError> {
    tokio::time::timeout(timeout, read_header_untimed(stream))
        .await
        .map_err(|_| ProxyHeaderError::TimedOut(timeout))?
}

async fn read_header_untimed(stream: &mut TcpStream) -> Result<ProxyHeader, ProxyHeaderError> {
    let mut buf = vec![0; V2_FIXED_LEN + MAX_V2_PAYLOAD];
    // Bytes already consumed, all of them the header's.
    let mut have = 0;
    // How far the header may reach, as far as its bytes so far tell.
    let mut limit = MAX_V1_LEN;
    loop {
        let peeked = stream.peek(&mut buf[have..limit]).await?;
        if peeked == 0 {
            return Err(ProxyHeaderError::Closed { received: have });
        }
        match scan(&buf[..have + peeked])? {
            Scan::Complete(len) => {
                stream.read_exact(&mut buf[have..len]).await?;
                return parse(&buf[..len]);
            }
            Scan::Incomplete { reach } => {
                // Every byte peeked is the header's: take them, so the next peek waits for
                // new ones.
                stream.read_exact(&mut buf[have..have + peeked]).await?;
                have += peeked;
                limit = reach;
            }
        }
    }
}

enum Scan {
    /// The header is the first `.0` bytes.
    Complete(usize),
    /// More bytes are needed; the header ends at `reach` bytes at the most.
    Incomplete { reach: usize },
}

/// Tells from the first bytes received whether they begin a header and where it ends,
/// refusing as early as the bytes allow (an HTTP request is refused on its first byte or two).
fn scan(bytes: &[u8]) -> Result<Scan, ProxyHeaderError> {
    if is_prefix_either_way(bytes, V1_PREFIX) {
        if let Some(cr) = memchr::memmem::find(bytes, b"\r\n") {
            return Ok(Scan::Complete(cr + 2));
        }
        if bytes.len() >= MAX_V1_LEN {
            return Err(ProxyHeaderError::MalformedV1("no CRLF within 107 bytes"));
        }
        return Ok(Scan::Incomplete { reach: MAX_V1_LEN });
    }
    if !is_prefix_either_way(bytes, V2_SIGNATURE) {
        return Err(ProxyHeaderError::NotProxy);
    }
    if let Some(&version_command) = bytes.get(12) {
        let version = version_command >> 4;
        if version != 2 {
            return Err(ProxyHeaderError::UnsupportedVersion(version));
        }
    }
    if bytes.len() < V2_FIXED_LEN {
        return Ok(Scan::Incomplete {
            reach: V2_FIXED_LEN,
        });
    }
    let payload = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if payload > MAX_V2_PAYLOAD {
        return Err(ProxyHeaderError::V2TooLong(payload));
    }
    let len = V2_FIXED_LEN + payload;
    Ok(if bytes.len() >= len {
        Scan::Complete(len)
    } else {
        Scan::Incomplete { reach: len }
    })
}

fn is_prefix_either_way(bytes: &[u8], prefix: &[u8]) -> bool {
    let common = bytes.len().min(prefix.len());
    bytes[..common] == prefix[..common]
}

/// Parses a whole header, as [`scan`] delimited it.
fn parse(header: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    if header.starts_with(V1_PREFIX) {
        parse_v1(header)
    } else {
        parse_v2(header)
    }
}

fn parse_v1(header: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    use ProxyHeaderError::MalformedV1;
    let line = &header[V1_PREFIX.len()..header.len() - 2];
    if line.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Err(MalformedV1("stray CR or LF"));
    }
    let line = std::str::from_utf8(line).map_err(|_| MalformedV1("not ASCII"))?;
    if !line.is_ascii() {
        return Err(MalformedV1("not ASCII"));
    }
    let mut fields = line.split(' ');
    let protocol = fields.next().unwrap_or_default();
    let family_is_v4 = match protocol {
        // The spec has the receiver ignore whatever follows UNKNOWN.
        "UNKNOWN" => return Ok(ProxyHeader::Local),
        "TCP4" => true,
        "TCP6" => false,
        _ => return Err(MalformedV1("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let (Some(source), Some(destination), Some(source_port), Some(destination_port), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(MalformedV1(
            "not four fields after the protocol, one space apart",
        ));
    };
    let address = |text: &str| -> Result<IpAddr, ProxyHeaderError> {
        if family_is_v4 {
            text.parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| MalformedV1("not an IPv4 address after TCP4"))
        } else {
            text.parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| MalformedV1("not an IPv6 address after TCP6"))
        }
    };
    Ok(ProxyHeader::Proxied {
        source: SocketAddr::new(address(source)?, parse_v1_port(source_port)?),
        destination: SocketAddr::new(address(destination)?, parse_v1_port(destination_port)?),
    })
}

/// A port in decimal digits only: `u16::from_str` would also take a leading `+`.
fn parse_v1_port(text: &str) -> Result<u16, ProxyHeaderError> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProxyHeaderError::MalformedV1("port is not 0 to 65535"));
    }
    text.parse()
        .map_err(|_| ProxyHeaderError::MalformedV1("port is not 0 to 65535"))
}

const COMMAND_LOCAL: u8 = 0x0;
const COMMAND_PROXY: u8 = 0x1;
const TCP_OVER_IPV4: u8 = 0x11;
const UDP_OVER_IPV4: u8 = 0x12;
const TCP_OVER_IPV6: u8 = 0x21;
const UDP_OVER_IPV6: u8 = 0x22;
const UNSPEC: u8 = 0x00;
const STREAM_OVER_UNIX: u8 = 0x31;
const DGRAM_OVER_UNIX: u8 = 0x32;

fn parse_v2(header: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    use ProxyHeaderError::MalformedV2;
    let payload = &header[V2_FIXED_LEN..];
    match header[12] & 0x0f {
        // The balancer's own connection: the spec has the family and block ignored.
        COMMAND_LOCAL => return Ok(ProxyHeader::Local),
        COMMAND_PROXY => {}
        _ => return Err(MalformedV2("command is neither LOCAL nor PROXY")),
    }
    let family = header[13];
    let address_len = match family {
        UNSPEC => 0,
        TCP_OVER_IPV4 | UDP_OVER_IPV4 => 12,
        TCP_OVER_IPV6 | UDP_OVER_IPV6 => 36,
        STREAM_OVER_UNIX | DGRAM_OVER_UNIX => 216,
        _ => return Err(MalformedV2("unknown address family or transport")),
    };
    let Some((addresses, tlvs)) = payload.split_at_checked(address_len) else {
        return Err(MalformedV2("length shorter than the family's addresses"));
    };
    check_tlvs(tlvs)?;
    let port = |at: usize| u16::from_be_bytes([addresses[at], addresses[at + 1]]);
    Ok(match family {
        TCP_OVER_IPV4 => {
            let ip = |at: usize| {
                IpAddr::from(<[u8; 4]>::try_from(&addresses[at..at + 4]).expect("4 bytes"))
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        TCP_OVER_IPV6 => {
            let ip = |at: usize| {
                IpAddr::from(<[u8; 16]>::try_from(&addresses[at..at + 16]).expect("16 bytes"))
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        // No TCP client to name (HAProxy keeps the connection's addresses too).
        _ => ProxyHeader::Local,
    })
}

/// TLVs are skipped, but as HAProxy does, one that overruns the header refuses it.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), ProxyHeaderError> {
    while !tlvs.is_empty() {
        let [_kind, high, low, rest @ ..] = tlvs else {
            return Err(ProxyHeaderError::MalformedV2("truncated TLV"));
        };
        let len = usize::from(u16::from_be_bytes([*high, *low]));
        tlvs = rest
            .get(len..)
            .ok_or(ProxyHeaderError::MalformedV2("TLV overruns the header"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    const AFTER: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    const WITHIN: Duration = Duration::from_secs(5);

    /// A connected pair: the client end, and the accepted end the header is read from.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        client.set_nodelay(true).unwrap();
        (client, accepted)
    }

    /// Sends `chunks` one write at a time (pausing so they arrive as separate segments),
    /// then reads the header and returns it with every byte the server end gets after it.
    async fn exchange(chunks: &[&[u8]]) -> (Result<ProxyHeader, ProxyHeaderError>, Vec<u8>) {
        let (mut client, mut server) = pair().await;
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for chunk in chunks {
                client.write_all(&chunk).await.unwrap();
                client.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client.shutdown().await.unwrap();
            client
        });
        let header = read_header(&mut server, WITHIN).await;
        let mut rest = Vec::new();
        if header.is_ok() {
            server.read_to_end(&mut rest).await.unwrap();
        }
        drop(writer.await.unwrap());
        (header, rest)
    }

    fn proxied(source: &str, destination: &str) -> ProxyHeader {
        ProxyHeader::Proxied {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        header.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
        header.extend_from_slice(payload);
        header
    }

    fn with_after(header: &[u8]) -> Vec<u8> {
        [header, AFTER].concat()
    }

    #[tokio::test]
    async fn v1_tcp4_names_the_client_and_leaves_the_request() {
        let bytes = with_after(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let (header, rest) = exchange(&[&bytes]).await;
        assert_eq!(
            header.unwrap(),
            proxied("192.168.0.1:56324", "192.168.0.11:443")
        );
        assert_eq!(rest, AFTER);
    }

    #[tokio::test]
    async fn v1_tcp6_and_unknown() {
        let bytes = with_after(b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 65535 0\r\n");
        let (header, rest) = exchange(&[&bytes]).await;
        assert_eq!(
            header.unwrap(),
            proxied("[2001:db8::1]:65535", "[::ffff:10.0.0.1]:0")
        );
        assert_eq!(rest, AFTER);

        for unknown in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        ] {
            let (header, rest) = exchange(&[&with_after(unknown)]).await;
            assert_eq!(header.unwrap(), ProxyHeader::Local);
            assert_eq!(rest, AFTER);
        }
    }

    #[tokio::test]
    async fn v1_arriving_in_pieces() {
        let (header, rest) = exchange(&[
            b"PR",
            b"OXY TCP4 1.2.3.4 5.6.7.8 1",
            b"000 80\r",
            b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ])
        .await;
        assert_eq!(header.unwrap(), proxied("1.2.3.4:1000", "5.6.7.8:80"));
        assert_eq!(rest, AFTER);
    }

    #[tokio::test]
    async fn v1_outside_the_grammar_is_refused() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 80 extra\r\n"[..],
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1000 80\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1000 80\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 65536\r\n",
            b"PROXY TCP4 ::1 ::1 1000 80\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1000 80\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 80\n\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1000 80\r\n",
            b"PROXY tcp4 1.2.3.4 5.6.7.8 1000 80\r\n",
        ] {
            let (header, _) = exchange(&[bad]).await;
            let error = header.unwrap_err();
            assert!(
                matches!(error, ProxyHeaderError::MalformedV1(_)),
                "{:?}: {error}",
                String::from_utf8_lossy(bad)
            );
            assert!(error.to_string().starts_with("malformed PROXY v1 header"));
        }
        // A line that never ends is refused at the spec's limit, not read on.
        let endless = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        let (header, _) = exchange(&[&endless]).await;
        assert!(matches!(header, Err(ProxyHeaderError::MalformedV1(_))));
    }

    #[tokio::test]
    async fn v2_ipv4_and_ipv6_with_tlvs() {
        // An ALPN TLV and a NOOP one, skipped.
        let tlvs = b"\x01\x00\x02h2\x04\x00\x00";
        let ipv4 = [
            &[10, 0, 0, 1, 10, 0, 0, 2, 0x1f, 0x90, 0x01, 0xbb][..],
            tlvs,
        ]
        .concat();
        let (header, rest) = exchange(&[&with_after(&v2(1, TCP_OVER_IPV4, &ipv4))]).await;
        assert_eq!(header.unwrap(), proxied("10.0.0.1:8080", "10.0.0.2:443"));
        assert_eq!(rest, AFTER);

        let source: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let destination: Ipv6Addr = "fe80::1".parse().unwrap();
        let ipv6 = [
            &source.octets()[..],
            &destination.octets(),
            &[0xc0, 0x00, 0x00, 0x50],
            tlvs,
        ]
        .concat();
        let (header, rest) = exchange(&[&with_after(&v2(1, TCP_OVER_IPV6, &ipv6))]).await;
        assert_eq!(
            header.unwrap(),
            proxied("[2001:db8::7]:49152", "[fe80::1]:80")
        );
        assert_eq!(rest, AFTER);
    }

    #[tokio::test]
    async fn v2_local_unspec_and_unix_keep_the_connections_addresses() {
        let cases = [
            v2(0, UNSPEC, b""),
            v2(0, UNSPEC, b"\x04\x00\x03abc"),
            v2(0, TCP_OVER_IPV4, &[0; 12]),
            v2(1, UNSPEC, b""),
            v2(1, STREAM_OVER_UNIX, &[b'/'; 216]),
        ];
        for bytes in cases {
            let (header, rest) = exchange(&[&with_after(&bytes)]).await;
            assert_eq!(header.unwrap(), ProxyHeader::Local, "{bytes:?}");
            assert_eq!(rest, AFTER);
        }
    }

    #[tokio::test]
    async fn v2_arriving_in_pieces() {
        let bytes = with_after(&v2(1, TCP_OVER_IPV4, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]));
        let (header, rest) =
            exchange(&[&bytes[..5], &bytes[5..15], &bytes[15..20], &bytes[20..]]).await;
        assert_eq!(header.unwrap(), proxied("1.2.3.4:1", "5.6.7.8:2"));
        assert_eq!(rest, AFTER);
    }

    #[tokio::test]
    async fn v2_outside_the_layout_is_refused() {
        let mut version_1 = v2(1, TCP_OVER_IPV4, &[0; 12]);
        version_1[12] = 0x11;
        let (header, _) = exchange(&[&version_1]).await;
        let error = header.unwrap_err();
        assert!(matches!(error, ProxyHeaderError::UnsupportedVersion(1)));
        assert_eq!(error.to_string(), "unsupported PROXY protocol version 1");

        for bad in [
            v2(2, TCP_OVER_IPV4, &[0; 12]),
            v2(1, 0x41, &[0; 12]),
            v2(1, TCP_OVER_IPV4, &[0; 11]),
            v2(1, TCP_OVER_IPV6, &[0; 12]),
            v2(
                1,
                TCP_OVER_IPV4,
                &[[0; 12].as_slice(), b"\x04\x00\x05ab"].concat(),
            ),
            v2(
                1,
                TCP_OVER_IPV4,
                &[[0; 12].as_slice(), b"\x04\x00"].concat(),
            ),
        ] {
            let (header, _) = exchange(&[&bad]).await;
            assert!(
                matches!(header, Err(ProxyHeaderError::MalformedV2(_))),
                "{bad:?}: {header:?}"
            );
        }
    }

    #[tokio::test]
    async fn v2_oversized_length_is_refused_before_its_bytes() {
        let mut header = v2(1, TCP_OVER_IPV4, b"");
        header[14..16].copy_from_slice(&2049_u16.to_be_bytes());
        // Only the fixed part is sent: the length alone refuses it.
        let (result, _) = exchange(&[&header]).await;
        let error = result.unwrap_err();
        assert!(
            matches!(error, ProxyHeaderError::V2TooLong(2049)),
            "{error}"
        );
        assert!(error.to_string().contains("too long"));
    }

    #[tokio::test]
    async fn plain_http_tls_and_garbage_are_refused() {
        for bytes in [
            AFTER,
            b"\x16\x03\x01\x02\x00\x01",
            b"\r\n\r\nhello",
            b"PROXX",
        ] {
            let (header, _) = exchange(&[bytes]).await;
            let error = header.unwrap_err();
            assert!(matches!(error, ProxyHeaderError::NotProxy), "{error}");
            assert_eq!(error.to_string(), "no PROXY protocol header");
        }
    }

    #[tokio::test]
    async fn a_header_cut_short_by_the_client_is_refused() {
        let v2_cut = v2(1, TCP_OVER_IPV4, &[0; 12]);
        for cut in [&b"PROXY TCP4 1.2.3.4"[..], &v2_cut[..20], b""] {
            let (header, _) = exchange(&[cut]).await;
            match header {
                Err(ProxyHeaderError::Closed { received }) => assert_eq!(received, cut.len()),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_silent_client_times_out() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4").await.unwrap();
        let within = Duration::from_millis(200);
        let started = tokio::time::Instant::now();
        let error = read_header(&mut server, within).await.unwrap_err();
        assert!(matches!(error, ProxyHeaderError::TimedOut(_)), "{error}");
        assert!(error.to_string().starts_with("timed out"));
        assert!(started.elapsed() >= within);
        drop(client);
    }
}
