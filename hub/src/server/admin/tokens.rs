//! Admin and enrollment tokens: creating, listing and revoking them, all audited.

use super::*;

/// Creates an admin token that stops working at `expires` (Unix seconds; never when None); also
/// used by `admin bootstrap` on the hub host.
pub async fn new_admin_token(
    store: &crate::store::Store,
    name: &str,
    role: Role,
    expires: Option<u64>,
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
        role: role_record(role),
        created: unix_now(),
        expires,
    };
    store
        .insert_admin_token(&sha256(token.as_bytes()).0, &record)
        .await?;
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
    let actor = require(&hub, &headers, Role::Admin).await?;
    let Json(request) = body?;
    if request.expires_in_secs == Some(0) {
        return Err(AdminError::bad_request("expires_in_secs must be positive"));
    }
    let expires = request
        .expires_in_secs
        .map(|secs| unix_now().saturating_add(secs));
    let created = new_admin_token(&hub.store, &request.name, request.role, expires).await?;
    audit(
        &hub,
        &actor,
        "admin-token create",
        &created.id,
        &format!(
            "{} as {}, expires {}",
            request.name,
            request.role.as_str(),
            expires.map_or_else(|| "never".to_owned(), |at| at.to_string())
        ),
    )
    .await?;
    hub.store.flush().await?;
    Ok((StatusCode::CREATED, Json(created)))
}

fn admin_token_info(record: &AdminTokenRecord) -> AdminTokenInfo {
    AdminTokenInfo {
        id: record.id.clone(),
        name: record.name.clone(),
        role: role_of(record.role),
        created: record.created,
        expires: record.expires,
    }
}

pub(super) async fn list_admin_tokens(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<Vec<AdminTokenInfo>> {
    require(&hub, &headers, Role::Admin).await?;
    let mut tokens = hub.store.admin_tokens().await?;
    tokens.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
    Ok(Json(tokens.iter().map(admin_token_info).collect()))
}

/// Revokes an admin token: it stops working at once. The hub's last admin token that has not
/// expired is kept, so that the hub is never left with nobody able to make tokens (short of
/// `admin bootstrap` with the hub stopped).
pub(super) async fn revoke_admin_token(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply<AdminTokenInfo> {
    let actor = require(&hub, &headers, Role::Admin).await?;
    let now = unix_now();
    let outcome = hub
        .store
        .revoke_admin_token(&id, |record, others| {
            let another_admin = others
                .iter()
                .any(|other| other.role == RoleRecord::Admin && !other.expired(now));
            if record.role == RoleRecord::Admin && !record.expired(now) && !another_admin {
                return Err(AdminError::conflict(format!(
                    "token {id} ({:?}) is the hub's last admin token that has not expired: create \
                 another admin token first",
                    record.name
                )));
            }
            Ok(())
        })
        .await?;
    let revoked = match outcome {
        None => return Err(AdminError::not_found(format!("no admin token {id}"))),
        Some(refused) => refused?,
    };
    audit(
        &hub,
        &actor,
        "admin-token revoke",
        &id,
        &format!("{} as {}", revoked.name, role_of(revoked.role).as_str()),
    )
    .await?;
    hub.store.flush().await?;
    log::info!(
        "admin token {id} ({}) revoked by {}",
        revoked.name,
        actor.name
    );
    Ok(Json(admin_token_info(&revoked)))
}

/// Revokes an enrollment token: no device can enroll with it from now on.
pub(super) async fn revoke_enroll_token(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply<EnrollTokenInfo> {
    let actor = require(&hub, &headers, Role::Admin).await?;
    let Some(revoked) = hub.store.revoke_enroll_token(&id).await? else {
        return Err(AdminError::not_found(format!("no enrollment token {id}")));
    };
    let info = enroll_token_info(&revoked);
    audit(
        &hub,
        &actor,
        "enroll-token revoke",
        &id,
        &format!("labels {:?}, {} uses left", info.labels, info.uses_left),
    )
    .await?;
    hub.store.flush().await?;
    Ok(Json(info))
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
    let actor = require(&hub, &headers, Role::Admin).await?;
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
        .insert_enroll_token(&sha256(token.as_bytes()).0, &record)
        .await?;
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
    )
    .await?;
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
    require(&hub, &headers, Role::Admin).await?;
    Ok(Json(
        hub.store
            .enroll_tokens()
            .await?
            .iter()
            .map(enroll_token_info)
            .collect(),
    ))
}
