//! The uid of the local process at the other end of a loopback TCP connection, for
//! `api.allowed_uids`. `SO_PEERCRED` exists only for Unix sockets; for TCP the kernel lists
//! every socket with its owner in `/proc/net/tcp` and `/proc/net/tcp6` (the way identd
//! answers). The caller's socket is the one whose local address is our peer address and whose
//! remote address is our local address. It exists as long as the connection is open, and only
//! its owner (or root) can have created it, so the uid cannot be forged by the caller.

use super::guard::PeerUid;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Looks the connection `ours` (our end) ↔ `peer` up in the kernel's socket tables.
pub fn uid_of(peer: SocketAddr, ours: SocketAddr) -> PeerUid {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        if let Some(uid) = find_uid(&text, peer, ours) {
            return PeerUid::Known(uid);
        }
    }
    PeerUid::Unknown
}

/// The uid of the socket in `table` (the text of `/proc/net/tcp` or `/proc/net/tcp6`) bound
/// to `local` and connected to `remote`. IPv4-mapped IPv6 addresses match their IPv4 form (a
/// dual-stack listener sees an IPv4 caller as `::ffff:a.b.c.d`).
pub fn find_uid(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let canon = |a: SocketAddr| (a.ip().to_canonical(), a.port());
    let (local, remote) = (canon(local), canon(remote));
    table.lines().skip(1).find_map(|line| {
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid ...
        let mut f = line.split_whitespace();
        let (_, l, r) = (f.next()?, parse_addr(f.next()?)?, parse_addr(f.next()?)?);
        let uid = f.nth(4)?.parse().ok()?;
        (canon(l) == local && canon(r) == remote).then_some(uid)
    })
}

/// `0100007F:3039` (IPv4) or 32 hex digits `:PORT` (IPv6): the address as the kernel printed
/// it, 32-bit words in host byte order; the port as a number.
fn parse_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word =
        |i: usize| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::to_ne_bytes);
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_loopback_connection_is_found_with_our_own_uid() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(uid_of(peer, listener.local_addr().unwrap()), PeerUid::Known(me));
        // A port nobody is connected from: no socket matches.
        let missing = SocketAddr::new(peer.ip(), peer.port().wrapping_add(1));
        assert_eq!(uid_of(missing, listener.local_addr().unwrap()), PeerUid::Unknown);
    }

    #[test]
    fn an_ipv6_loopback_connection_is_found() {
        let Ok(listener) = TcpListener::bind("[::1]:0") else {
            // IPv6 disabled in this kernel: the path is covered by the parser test below.
            assert!(
                std::fs::read_to_string("/proc/net/if_inet6")
                    .map_or(true, |t| !t.contains("00000000000000000000000000000001"))
            );
            return;
        };
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        assert_eq!(
            uid_of(peer, listener.local_addr().unwrap()),
            PeerUid::Known(nix::unistd::geteuid().as_raw())
        );
    }

    #[test]
    fn kernel_lines_parse_in_both_families() {
        // Lines as a little-endian kernel prints them (x86, arm64 as deployed).
        let v4 = concat!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  ",
            "timeout inode\n",
            "   0: 0100007F:3039 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0  ",
            "      0 1 1 0 100 0 0 10 0\n",
            "   1: 0100007F:D431 0100007F:3039 01 00000000:00000000 00:00000000 00000000  1000  ",
            "      0 2 1 0 20 4 30 10 -1\n",
        );
        let l: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        let r: SocketAddr = "127.0.0.1:12345".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(find_uid(v4, l, r), Some(1000));
            assert_eq!(find_uid(v4, r, l), None, "the listener is not connected to the caller");
            // A dual-stack listener names the caller in its IPv4-mapped form.
            assert_eq!(
                find_uid(
                    v4,
                    "[::ffff:127.0.0.1]:54321".parse().unwrap(),
                    "[::ffff:127.0.0.1]:12345".parse().unwrap()
                ),
                Some(1000)
            );
            let v6 = concat!(
                "  sl  local_address                         remote_address                     ",
                "   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n",
                "   0: 00000000000000000000000001000000:D431 ",
                "00000000000000000000000001000000:3039 ",
                "01 00000000:00000000 00:00000000 00000000    65534        0 3 1\n",
            );
            assert_eq!(
                find_uid(v6, "[::1]:54321".parse().unwrap(), "[::1]:12345".parse().unwrap()),
                Some(65534)
            );
        }
        assert_eq!(find_uid("header\ngarbage line\n", l, r), None);
    }
}
