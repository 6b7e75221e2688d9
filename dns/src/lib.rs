//! seine-dns, a CoreDNS-compatible cluster DNS server (issue 6, in progress). So far: the Corefile
//! (`corefile`), read as CoreDNS reads it, with an error naming the line for anything seine-dns does
//! not implement.

pub mod corefile;
