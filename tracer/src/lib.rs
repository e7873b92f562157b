//! xfrm-trace: tells, live, why a Linux IPsec VPN drops, leaks or breaks
//! packets. One module per concern.

pub mod attribution;
pub mod btf;
pub mod bundle;
pub mod capabilities;
pub mod cli;
pub mod counters;
pub mod diagnosis;
pub mod doctor;
pub mod drops;
pub mod ebpf;
pub mod filter;
pub mod fsutil;
pub mod hooks;
pub mod ike;
pub mod kallsyms;
pub mod lab;
pub mod masquerade;
pub mod model;
pub mod mtu;
pub mod netns;
pub mod pcap;
pub mod pluto;
pub mod privilege;
pub mod prometheus;
pub mod render;
pub mod report;
pub mod scenarios;
pub mod trace;
pub mod tracefs;
pub mod xfrm_stat;
pub mod xfrm_state;
