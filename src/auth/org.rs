//! Which Grafana organisation a request runs in. Grafana reads it from the
//! `X-Grafana-Org-Id` header or the `targetOrgId` query parameter; without
//! either, the user's current org applies. The gateway judges the request
//! with the caller's role in that same org, so both readings must agree.

use http::HeaderMap;

pub const ORG_HEADER: &str = "x-grafana-org-id";
const ORG_QUERY: &str = "targetOrgId";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrgError {
    #[error("X-Grafana-Org-Id must be one positive organisation id")]
    BadHeader,
    #[error("targetOrgId must be a positive organisation id")]
    BadQuery,
    #[error("X-Grafana-Org-Id and targetOrgId name different organisations")]
    Conflict,
}

/// The org the request selects, if any.
pub fn requested(headers: &HeaderMap, query: Option<&str>) -> Result<Option<i64>, OrgError> {
    let mut values = headers.get_all(ORG_HEADER).iter();
    let from_header = match values.next() {
        None => None,
        Some(value) => {
            if values.next().is_some() {
                return Err(OrgError::BadHeader);
            }
            let id = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|id| *id > 0)
                .ok_or(OrgError::BadHeader)?;
            Some(id)
        }
    };
    // Grafana reads the query as Go's `URL.Query()` does: names and values
    // unescaped (`targetOrg%49d` is `targetOrgId` there).
    let from_query = match query {
        Some(q) if q.contains(ORG_QUERY) || q.contains('%') => {
            let mut found = None;
            for (name, value) in form_urlencoded::parse(q.as_bytes()) {
                if name == ORG_QUERY {
                    let id = value
                        .parse::<i64>()
                        .ok()
                        .filter(|id| *id > 0)
                        .ok_or(OrgError::BadQuery)?;
                    if found.is_some_and(|f| f != id) {
                        return Err(OrgError::BadQuery);
                    }
                    found = Some(id);
                }
            }
            found
        }
        _ => None,
    };
    match (from_header, from_query) {
        (Some(h), Some(q)) if h != q => Err(OrgError::Conflict),
        (h, q) => Ok(h.or(q)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(ORG_HEADER, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn header_and_query() {
        assert_eq!(requested(&headers(&[]), None), Ok(None));
        assert_eq!(requested(&headers(&["2"]), None), Ok(Some(2)));
        assert_eq!(requested(&headers(&[]), Some("a=1&targetOrgId=3")), Ok(Some(3)));
        assert_eq!(requested(&headers(&["3"]), Some("targetOrgId=3")), Ok(Some(3)));
        assert_eq!(
            requested(&headers(&["2"]), Some("targetOrgId=3")),
            Err(OrgError::Conflict)
        );
        assert_eq!(requested(&headers(&["x"]), None), Err(OrgError::BadHeader));
        assert_eq!(requested(&headers(&["0"]), None), Err(OrgError::BadHeader));
        assert_eq!(requested(&headers(&["1", "2"]), None), Err(OrgError::BadHeader));
        assert_eq!(
            requested(&headers(&[]), Some("targetOrgId=")),
            Err(OrgError::BadQuery)
        );
        assert_eq!(requested(&headers(&[]), Some("xtargetOrgId=2")), Ok(None));
        assert_eq!(requested(&headers(&[]), Some("targetOrg%49d=2")), Ok(Some(2)));
        assert_eq!(
            requested(&headers(&["1"]), Some("targetOrg%49d=2")),
            Err(OrgError::Conflict)
        );
    }
}
