//! Small operating-system helpers: process memory, file-descriptor limits, socket options.

use std::io;

/// Resident set size of process `pid` in KiB, from `/proc/PID/status` (`VmRSS`).
pub fn rss_kb(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss_kb(&status)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no VmRSS line in /proc/{pid}/status")))
}

/// Extracts `VmRSS` (KiB) from the text of `/proc/PID/status`.
pub fn parse_vm_rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        None | Some("kB") => Some(value),
        Some(_) => None,
    }
}

/// Raises the soft limit on open files to the hard limit. Returns the soft limit now in force.
#[cfg(unix)]
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every platform
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: `raised` is a valid rlimit that only raises the soft limit up to the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(raised.rlim_cur as u64);
        }
    }
    Ok(limit.rlim_cur as u64)
}

#[cfg(not(unix))]
pub fn raise_nofile_limit() -> io::Result<u64> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "not supported on this platform"))
}

/// Lets the kernel pick the source port at `connect` rather than at `bind`, so that sockets
/// bound to one source address share ports across destinations. Best effort.
#[cfg(target_os = "linux")]
pub fn bind_address_no_port(socket: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: the descriptor is owned by `socket` and open; the option value is a c_int.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
pub fn bind_address_no_port(_socket: &tokio::net::TcpSocket) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\tconvoy-node\nVmPeak:\t  900 kB\nVmRSS:\t  123456 kB\nThreads:\t8\n";
        assert_eq!(parse_vm_rss_kb(status), Some(123_456));
        assert_eq!(parse_vm_rss_kb("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss_kb("VmRSS:\tlots kB\n"), None);
        assert_eq!(parse_vm_rss_kb("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn reads_own_rss() {
        assert!(rss_kb(std::process::id()).unwrap() > 0);
        assert!(rss_kb(u32::MAX).is_err());
    }
}
