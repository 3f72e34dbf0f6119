//! Admin and enrollment tokens: creating them and listing the enrollment tokens.

use super::*;

/// Creates an admin token; also used by `admin bootstrap` on the hub host.
pub fn new_admin_token(
    store: &crate::store::Store,
    name: &str,
    role: Role,
) -> Result<CreatedToken, AdminError> {
    if name.trim().is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(AdminError::bad_request(
            "token name must be 1 to 64 printable characters",
        ));
    }
    let token = format!("opa_{}", random_hex(32)?);
    let record = AdminTokenRecord {
        id: random_hex(8)?,
        name: name.to_owned(),
        role,
        created: unix_now(),
    };
    store.insert_admin_token(&sha256(token.as_bytes()).0, &record)?;
    Ok(CreatedToken {
        id: record.id,
        token,
    })
}

pub(super) async fn create_admin_token(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Json<CreateAdminToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), AdminError> {
    let actor = require(&hub, &headers, Role::Admin)?;
    let Json(request) = body?;
    let created = new_admin_token(&hub.store, &request.name, request.role)?;
    audit(
        &hub,
        &actor,
        "admin-token create",
        &created.id,
        &format!("{} as {}", request.name, request.role.as_str()),
    )?;
    hub.store.flush().await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub(super) fn enroll_token_info(record: &EnrollTokenRecord) -> EnrollTokenInfo {
    EnrollTokenInfo {
        id: record.id.clone(),
        labels: record
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        expires: record.expires,
        uses_left: record.uses_left,
    }
}

pub(super) async fn create_enroll_token(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Json<CreateEnrollToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), AdminError> {
    let actor = require(&hub, &headers, Role::Admin)?;
    let Json(request) = body?;
    let labels = parse_labels(&request.labels)?;
    if request.uses == 0 {
        return Err(AdminError::bad_request("uses must be at least 1"));
    }
    if request.expires_in_secs == 0 {
        return Err(AdminError::bad_request("expires_in_secs must be positive"));
    }
    let token = format!("ope_{}", random_hex(32)?);
    let now = unix_now();
    let record = EnrollTokenRecord {
        id: random_hex(8)?,
        labels: labels
            .iter()
            .map(|l| (l.key.clone(), l.value.clone()))
            .collect(),
        expires: now.saturating_add(request.expires_in_secs),
        uses_left: request.uses,
        created: now,
    };
    hub.store
        .insert_enroll_token(&sha256(token.as_bytes()).0, &record)?;
    let info = enroll_token_info(&record);
    audit(
        &hub,
        &actor,
        "enroll-token create",
        &record.id,
        &format!(
            "labels {:?}, {} uses, expires {}",
            info.labels, record.uses_left, record.expires
        ),
    )?;
    hub.store.flush().await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id: record.id,
            token,
        }),
    ))
}

pub(super) async fn list_enroll_tokens(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<Vec<EnrollTokenInfo>> {
    require(&hub, &headers, Role::Admin)?;
    Ok(Json(
        hub.store
            .enroll_tokens()?
            .iter()
            .map(enroll_token_info)
            .collect(),
    ))
}
