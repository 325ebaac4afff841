//! File descriptors: every client is a socket, and systemd's default soft limit (1024) holds
//! far fewer than `max_connections: 1000` once listeners, stores and handshakes are counted.
//! At start the soft limit is raised to the hard one, and a `max_connections` the limit cannot
//! carry is refused before anything is bound.

/// Descriptors a running gateway uses besides its clients: listeners, stores, logs, the
/// dashboard, plug and bridge sockets, and the sockets still logging in (256).
pub const OVERHEAD: u64 = 256 + 128;

/// Raises the soft limit to the hard one; returns the limit in force.
pub fn raise_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// Checks that `max_connections` clients fit under the descriptor limit.
pub fn check(max_connections: u32) -> anyhow::Result<()> {
    let limit = raise_limit()?;
    let need = max_connections as u64 + OVERHEAD;
    if need > limit {
        anyhow::bail!(
            "broker.limits.max_connections: {max_connections} clients need about {need} file descriptors, \
             but this process may open {limit} (RLIMIT_NOFILE); lower max_connections to {} or raise the \
             limit (systemd: LimitNOFILE=)",
            limit.saturating_sub(OVERHEAD)
        );
    }
    Ok(())
}
