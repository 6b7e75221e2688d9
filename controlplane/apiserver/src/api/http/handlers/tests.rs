use super::*;

#[test]
fn names_must_be_dns_subdomains() {
    assert!(dns_subdomain_problem("web-1.example").is_none());
    for bad in ["", "Web", "-a", "a-", "a..b", "a_b"] {
        assert!(dns_subdomain_problem(bad).is_some(), "{bad:?}");
    }
}
