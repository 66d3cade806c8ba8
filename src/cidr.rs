//! Address ranges (`10.0.0.0/8`, `fd00::/8`) for the trusted proxies: parsed and matched,
//! IPv4-mapped IPv6 addresses counted as IPv4. Pure.

/// An address range, `10.0.0.0/8` or `fd00::/8` (a bare address is a range of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = text.trim().split_once('/').unwrap_or((text.trim(), ""));
        let network: std::net::IpAddr = addr.parse().map_err(|_| format!("{text:?} is not an address range"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix must be 0 to {max}"))?
        };
        Ok(Self { network, prefix })
    }

    /// A comma-separated list.
    pub fn list(text: &str) -> Result<Vec<Self>, String> {
        text.split(',')
            .filter(|c| !c.trim().is_empty())
            .map(Self::parse)
            .collect()
    }

    pub fn contains(&self, addr: std::net::IpAddr) -> bool {
        let bits = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32u32),
            std::net::IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let addr = match addr {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, std::net::IpAddr::V4),
            v4 => v4,
        };
        let ((net, width), (ip, ip_width)) = (bits(self.network), bits(addr));
        if width != ip_width {
            return false;
        }
        let mask = if self.prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix))
        };
        net & mask == ip & mask
    }
}
