//! Committing revisions: group commit.
//!
//! Every commit of this hub goes through one committer task (on the store's
//! [`Lane`]). It takes whatever requests queued while the previous group
//! was written and commits them in one transaction of a few statements,
//! whatever the group's size: the units are read in one `SELECT`, the
//! checks run here (in request order, so two requests for one unit get
//! consecutive numbers), and the rows are written with multi-row
//! statements. So commits that arrive together cost one transaction and one
//! `fsync`, not one each.
//!
//! A request is all-or-nothing and independent of the others in its group:
//! a request that fails a check is answered with its error and writes
//! nothing; the others commit. When the transaction itself fails (nothing
//! of the group is written), each request is committed again on its own,
//! so a value the database refuses fails only the request carrying it. A
//! queued request runs to its end even when its caller goes away.

use std::collections::{HashMap, HashSet};

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::{Any, AnyConnection, AnyPool};
use tokio::sync::{mpsc, oneshot};

use super::backend::{self, Backend};
use super::rows::{Columns, corrupt, db, int, labels_json, num};
use super::{NewPromotion, StoreError, StoreResult};
use crate::lane::Lane;
use crate::model::{
    Labels, NewAudit, NewRevision, PromotedUnit, PutMode, Revision, RevisionNum, UnitRef,
    UnixMillis,
};

/// One caller's revisions and the promotion that made them.
struct Request {
    revs: Vec<NewRevision>,
    promotion: Option<NewPromotion>,
    reply: oneshot::Sender<StoreResult<Committed>>,
}

/// The committed revisions (in request order) and the promotion's id.
pub(super) type Committed = (Vec<Revision>, Option<u64>);

/// A group stops taking requests at this many revisions (one request of
/// more is a group of its own).
const GROUP_REVISIONS: usize = 256;

/// Bind parameters per statement (SQLite allows 32,766, PostgreSQL 65,535);
/// longer lists are split.
const MAX_PARAMS: usize = 8_000;

/// Bytes of large values (manifests) per statement: a list of big
/// revisions is split too (PostgreSQL refuses a message over 1 GiB).
const MAX_STATEMENT_BYTES: usize = 32 << 20;

/// The queue to the committer task.
pub(super) struct Committer {
    queue: mpsc::UnboundedSender<Request>,
}

impl Committer {
    /// Starts the committer on `lane`.
    pub(super) fn start(lane: &Lane, writer: AnyPool, backend: Backend) -> Committer {
        let (queue, rx) = mpsc::unbounded_channel();
        drop(lane.spawn(run(rx, writer, backend)));
        Committer { queue }
    }

    /// Commits `revs` (and the promotion that made them) atomically.
    pub(super) async fn commit(
        &self,
        revs: Vec<NewRevision>,
        promotion: Option<NewPromotion>,
    ) -> StoreResult<Committed> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            revs,
            promotion,
            reply,
        };
        let closed = || StoreError::Database("the store is shutting down".into());
        self.queue.send(request).map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

/// Takes the queued requests a group at a time until the store goes.
async fn run(mut queue: mpsc::UnboundedReceiver<Request>, writer: AnyPool, backend: Backend) {
    while let Some(first) = queue.recv().await {
        let mut size = first.revs.len();
        let mut group = vec![first];
        while size < GROUP_REVISIONS {
            let Ok(next) = queue.try_recv() else { break };
            size += next.revs.len();
            group.push(next);
        }
        let (work, replies): (Vec<_>, Vec<_>) = group
            .into_iter()
            .map(|r| ((r.revs, r.promotion), r.reply))
            .unzip();
        let answers = commit_each(&writer, backend, work).await;
        for (reply, answer) in replies.into_iter().zip(answers) {
            // A caller that went away does not undo its commit.
            let _ = reply.send(answer);
        }
    }
}

/// Commits a group; if its transaction fails and it holds more than one
/// request, each request again on its own, so that what one request
/// carries (a value the database refuses) fails that request only.
async fn commit_each(
    writer: &AnyPool,
    backend: Backend,
    work: Vec<(Vec<NewRevision>, Option<NewPromotion>)>,
) -> Vec<StoreResult<Committed>> {
    if work.len() == 1 {
        return match commit_group(writer, backend, work).await {
            Ok(answers) => answers,
            Err(e) => vec![Err(e)],
        };
    }
    let again = work.clone();
    match commit_group(writer, backend, work).await {
        Ok(answers) => answers,
        Err(e) => {
            tracing::debug!(error = %crate::error::ErrorChain(&e), requests = again.len(), "a group commit failed; committing its requests one by one");
            let mut answers = Vec::with_capacity(again.len());
            for request in again {
                answers.push(match commit_group(writer, backend, vec![request]).await {
                    Ok(mut one) => one.pop().unwrap_or_else(|| Err(corrupt("no answer"))),
                    Err(e) => Err(e),
                });
            }
            answers
        }
    }
}

/// A unit as the group sees it: as stored, then as each accepted request
/// leaves it.
#[derive(Clone, Debug)]
struct UnitState {
    /// `None` until the unit is written (a unit this group creates).
    id: Option<i64>,
    head: RevisionNum,
    destroyed: bool,
    source: String,
    /// New labels, if a revision set them.
    labels: Option<Labels>,
    /// The upstream of a unit this group creates, or a new one a revision
    /// set (a promotion re-linking the unit).
    upstream: Option<String>,
}

/// What a group writes.
#[derive(Default)]
struct Plan {
    /// Units as they end up, those this group creates and those it changes.
    units: HashMap<UnitRef, UnitState>,
    /// Accepted revisions, with their numbers and requests.
    revisions: Vec<(usize, RevisionNum, NewRevision)>,
    /// Accepted requests' promotions.
    promotions: Vec<(usize, NewPromotion)>,
}

/// Commits a group of requests in one transaction: one answer per request.
async fn commit_group(
    writer: &AnyPool,
    backend: Backend,
    requests: Vec<(Vec<NewRevision>, Option<NewPromotion>)>,
) -> StoreResult<Vec<StoreResult<Committed>>> {
    let mut tx = writer.begin().await.map_err(db)?;
    let all_units: Vec<&UnitRef> = requests
        .iter()
        .flat_map(|(revs, _)| revs)
        .map(|r| &r.unit)
        .collect();
    backend.lock_units(&mut tx, all_units.into_iter()).await?;
    let known = Known::read(&mut tx, backend, &requests).await?;

    // The checks, request by request, against the units as the requests
    // accepted before left them.
    let now = UnixMillis::now();
    let mut plan = Plan::default();
    let mut answers: Vec<Option<StoreResult<Committed>>> = Vec::with_capacity(requests.len());
    for (i, (revs, promotion)) in requests.into_iter().enumerate() {
        let mut touched: HashMap<UnitRef, Option<UnitState>> = HashMap::new();
        let mut numbered = Vec::with_capacity(revs.len());
        let mut failed = None;
        for rev in revs {
            let state = touched.entry(rev.unit.clone()).or_insert_with(|| {
                plan.units
                    .get(&rev.unit)
                    .or_else(|| known.units.get(&rev.unit))
                    .cloned()
            });
            match known.check(&rev, state) {
                Ok(number) => numbered.push((number, rev)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            answers.push(Some(Err(e)));
            continue;
        }
        for (unit, state) in touched {
            if let Some(s) = state {
                plan.units.insert(unit, s);
            }
        }
        plan.revisions
            .extend(numbered.into_iter().map(|(n, rev)| (i, n, rev)));
        if let Some(p) = promotion {
            plan.promotions.push((i, p));
        }
        answers.push(None);
    }

    let committed = plan.write(&mut tx, backend, now).await?;
    tx.commit().await.map_err(db)?;

    let mut by_request: HashMap<usize, Committed> = HashMap::new();
    for (i, rev) in committed.revisions {
        by_request.entry(i).or_default().0.push(rev);
    }
    for (i, id) in committed.promotions {
        by_request.entry(i).or_default().1 = Some(id);
    }
    Ok(answers
        .into_iter()
        .enumerate()
        .map(|(i, a)| a.unwrap_or_else(|| Ok(by_request.remove(&i).unwrap_or_default())))
        .collect())
}

/// What the store holds for a group: its units, its environments, its
/// sources' states.
struct Known {
    units: HashMap<UnitRef, UnitState>,
    environments: HashSet<String>,
    /// Sources (`oci:NAME`) by name: suspended or not (missing: deleted).
    sources: HashMap<String, bool>,
}

impl Known {
    async fn read(
        tx: &mut AnyConnection,
        backend: Backend,
        requests: &[(Vec<NewRevision>, Option<NewPromotion>)],
    ) -> StoreResult<Known> {
        let revs: Vec<&NewRevision> = requests.iter().flat_map(|(revs, _)| revs).collect();
        let environments = sqlx::query_scalar::<_, String>("SELECT name FROM environments")
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?
            .into_iter()
            .collect();
        // An OCI source commits only while it exists and runs (its row is
        // locked against a concurrent delete or suspend).
        let mut names: Vec<&str> = revs
            .iter()
            .filter_map(|r| r.source.strip_prefix("oci:"))
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut sources = HashMap::new();
        for name in names {
            let select = format!(
                "SELECT suspended FROM oci_sources WHERE name = $1{}",
                backend.for_update()
            );
            let suspended: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(select))
                .bind(name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
            if let Some(s) = suspended {
                sources.insert(name.to_owned(), s != 0);
            }
        }
        let mut wanted: Vec<&UnitRef> = revs.iter().map(|r| &r.unit).collect();
        wanted.sort_unstable_by(|a, b| (&a.env, &a.name).cmp(&(&b.env, &b.name)));
        wanted.dedup();
        let lock = match backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE OF u",
        };
        let rows = rows_in_chunks(
            tx,
            backend,
            |values| {
                format!(
                    "SELECT u.id, u.environment, u.name, u.head, u.destroyed, u.source
                     FROM units u JOIN (VALUES {values}) AS v
                       ON u.environment = v.column1 AND u.name = v.column2{lock}"
                )
            },
            2,
            &wanted,
            |_| 0,
            |q, u| Ok(q.bind(u.env.as_str()).bind(u.name.as_str())),
        )
        .await?;
        let mut units = HashMap::new();
        for row in rows {
            let unit = super::rows::unit_ref(&row)?;
            let state = UnitState {
                id: Some(row.int("id")?),
                head: num(row.int("head")?),
                destroyed: row.int("destroyed")? != 0,
                source: row.text("source")?,
                labels: None,
                upstream: None,
            };
            units.insert(unit, state);
        }
        Ok(Known {
            units,
            environments,
            sources,
        })
    }

    /// Checks one revision against its unit's state (`None`: no such unit)
    /// and moves the state on; returns the revision's number.
    fn check(&self, rev: &NewRevision, state: &mut Option<UnitState>) -> StoreResult<RevisionNum> {
        if !self.environments.contains(rev.unit.env.as_str()) {
            return Err(StoreError::NotFound(format!(
                "environment {}",
                rev.unit.env
            )));
        }
        if let Some(name) = rev.source.strip_prefix("oci:") {
            match self.sources.get(name) {
                None => return Err(StoreError::Conflict(format!("source {name} was deleted"))),
                Some(true) => {
                    return Err(StoreError::Conflict(format!("source {name} is suspended")));
                }
                Some(false) => {}
            }
        }
        let Some(s) = state else {
            if let Some(expected) = rev.expected_head.filter(|h| h.0 > 0) {
                return Err(changed(&rev.unit, expected, RevisionNum(0)));
            }
            if rev.tombstone || rev.mode == PutMode::Update {
                return Err(StoreError::NotFound(format!("unit {}", rev.unit)));
            }
            *state = Some(UnitState {
                id: None,
                head: RevisionNum::FIRST,
                destroyed: false,
                source: rev.source.clone(),
                labels: Some(rev.labels.clone().unwrap_or_default()),
                upstream: rev.upstream.as_ref().map(ToString::to_string),
            });
            return Ok(RevisionNum::FIRST);
        };
        if s.source != rev.source {
            return Err(StoreError::Conflict(owned_elsewhere(&rev.unit, &s.source)));
        }
        if let Some(expected) = rev.expected_head
            && expected != s.head
        {
            return Err(changed(&rev.unit, expected, s.head));
        }
        match (rev.mode, s.destroyed, rev.tombstone) {
            (_, true, true) => {
                return Err(StoreError::Conflict(format!(
                    "unit {} is already destroyed",
                    rev.unit
                )));
            }
            (PutMode::Create, false, false) => {
                return Err(StoreError::AlreadyExists(format!("unit {}", rev.unit)));
            }
            (PutMode::Update, true, false) => {
                return Err(StoreError::NotFound(format!("unit {}", rev.unit)));
            }
            _ => {}
        }
        s.head = s.head.next();
        s.destroyed = rev.tombstone;
        if rev.labels.is_some() {
            s.labels = rev.labels.clone();
        }
        if let Some(u) = &rev.upstream {
            s.upstream = Some(u.to_string());
        }
        Ok(s.head)
    }
}

/// What a group wrote: revisions and promotion ids by request.
struct Written {
    revisions: Vec<(usize, Revision)>,
    promotions: Vec<(usize, u64)>,
}

impl Plan {
    /// Writes the plan: units created and changed, revisions, promotions
    /// and the audit entries, in a few statements.
    async fn write(
        self,
        tx: &mut AnyConnection,
        backend: Backend,
        now: UnixMillis,
    ) -> StoreResult<Written> {
        let Plan {
            mut units,
            revisions,
            promotions,
        } = self;
        write_units(tx, backend, &mut units, now).await?;
        insert_revisions(tx, backend, &units, &revisions, now).await?;
        backend
            .announce(
                tx,
                revisions
                    .iter()
                    .map(|(_, number, rev)| backend::revision_payload(&rev.unit, *number)),
            )
            .await?;

        // Promotions (their ids name them in the audit), then the audit
        // entries: each request's revisions, then its promotion.
        let mut audits: Vec<(usize, NewAudit)> = revisions
            .iter()
            .map(|(i, number, rev)| (*i, revision_audit(rev, *number)))
            .collect();
        let mut ids = Vec::with_capacity(promotions.len());
        for (i, p) in promotions {
            let numbers: Vec<RevisionNum> = revisions
                .iter()
                .filter(|(r, _, _)| *r == i)
                .map(|(_, n, _)| *n)
                .collect();
            let (id, audit) = insert_promotion(tx, p, &numbers, now).await?;
            ids.push((i, id));
            audits.push((i, audit));
        }
        // Stable: within a request, revisions before the promotion.
        audits.sort_by_key(|(i, _)| *i);
        insert_audits(tx, backend, &audits, now).await?;

        Ok(Written {
            revisions: revisions
                .into_iter()
                .map(|(i, number, rev)| {
                    let revision = Revision {
                        author: rev.author.to_string(),
                        unit: rev.unit,
                        number,
                        digest: rev.digest,
                        tombstone: rev.tombstone,
                        manifests: rev.manifests,
                        documents: rev.documents,
                        message: rev.message,
                        origin: rev.origin,
                        created_at: now,
                        source_revision: rev.source_revision,
                    };
                    (i, revision)
                })
                .collect(),
            promotions: ids,
        })
    }
}

/// Creates the units a group creates (setting their ids) and updates the
/// ones it changes.
async fn write_units(
    tx: &mut AnyConnection,
    backend: Backend,
    units: &mut HashMap<UnitRef, UnitState>,
    now: UnixMillis,
) -> StoreResult<()> {
    // Units this group creates (then their ids are known), and those
    // it changes.
    let created: Vec<(&UnitRef, &UnitState)> =
        units.iter().filter(|(_, s)| s.id.is_none()).collect();
    let rows = rows_in_chunks(
            tx,
            backend,
            |values| {
                format!(
                    "INSERT INTO units (environment, name, labels, head, destroyed, created_at, updated_at, upstream, source)
                     VALUES {values} RETURNING id, environment, name"
                )
            },
            9,
            &created,
            |_| 0,
            |q, (u, s)| {
                Ok(q.bind(u.env.as_str())
                    .bind(u.name.as_str())
                    .bind(labels_json(s.labels.as_ref().unwrap_or(&Labels::new())))
                    .bind(int(s.head.0)?)
                    .bind(i64::from(s.destroyed))
                    .bind(now.0)
                    .bind(now.0)
                    .bind(s.upstream.as_deref())
                    .bind(s.source.as_str()))
            },
        )
        .await?;
    let mut new_ids = HashMap::new();
    for row in rows {
        new_ids.insert(
            (row.text("environment")?, row.text("name")?),
            row.int("id")?,
        );
    }
    let updated: Vec<&UnitState> = units.values().filter(|s| s.id.is_some()).collect();
    rows_in_chunks(
        tx,
        backend,
        |values| {
            format!(
                "UPDATE units SET head = v.column1, destroyed = v.column2, updated_at = v.column3,
                       labels = COALESCE(v.column4, units.labels),
                       upstream = COALESCE(v.column6, units.upstream)
                     FROM (VALUES {values}) AS v WHERE units.id = v.column5"
            )
        },
        6,
        &updated,
        |_| 0,
        |q, s| {
            Ok(q.bind(int(s.head.0)?)
                .bind(i64::from(s.destroyed))
                .bind(now.0)
                .bind(s.labels.as_ref().map(labels_json))
                .bind(s.id)
                .bind(s.upstream.as_deref()))
        },
    )
    .await?;
    for (unit, state) in units.iter_mut() {
        if state.id.is_none() {
            let key = (unit.env.to_string(), unit.name.to_string());
            let id = new_ids
                .get(&key)
                .ok_or_else(|| corrupt(format!("unit {unit} was not created")))?;
            state.id = Some(*id);
        }
    }

    Ok(())
}

/// Inserts the accepted revisions.
async fn insert_revisions(
    tx: &mut AnyConnection,
    backend: Backend,
    units: &HashMap<UnitRef, UnitState>,
    revisions: &[(usize, RevisionNum, NewRevision)],
    now: UnixMillis,
) -> StoreResult<()> {
    let mut rows = Vec::with_capacity(revisions.len());
    for (i, number, rev) in revisions {
        let id = units.get(&rev.unit).and_then(|s| s.id);
        let id = id.ok_or_else(|| corrupt(format!("unit {} has no id", rev.unit)))?;
        rows.push((*i, *number, rev, id, rev.author.to_string()));
    }
    rows_in_chunks(
            tx,
            backend,
            |values| {
                format!(
                    "INSERT INTO revisions (unit_id, number, digest, tombstone, manifests, documents, author, message, origin, created_at, source_revision)
                     VALUES {values}"
                )
            },
            11,
            &rows,
            |(_, _, rev, _, _)| rev.manifests.len(),
            |q, (_, number, rev, id, author)| {
                Ok(q.bind(*id)
                    .bind(int(number.0)?)
                    .bind(rev.digest.to_hex())
                    .bind(i64::from(rev.tombstone))
                    .bind(&*rev.manifests)
                    .bind(i64::from(rev.documents))
                    .bind(author.as_str())
                    .bind(rev.message.as_str())
                    .bind(rev.origin.as_str())
                    .bind(now.0)
                    .bind(int(rev.source_revision.0)?))
            },
        )
        .await?;
    Ok(())
}

/// Inserts audit entries (in the order given).
async fn insert_audits(
    tx: &mut AnyConnection,
    backend: Backend,
    audits: &[(usize, NewAudit)],
    now: UnixMillis,
) -> StoreResult<()> {
    rows_in_chunks(
        tx,
        backend,
        |values| format!("INSERT INTO audit (time, actor, action, target, detail) VALUES {values}"),
        5,
        audits,
        |_| 0,
        |q, (_, a)| {
            Ok(q.bind(now.0)
                .bind(a.actor.to_string())
                .bind(a.action)
                .bind(a.target.as_str())
                .bind(a.detail.as_str()))
        },
    )
    .await?;
    Ok(())
}

/// The audit entry of a committed revision.
fn revision_audit(rev: &NewRevision, number: RevisionNum) -> NewAudit {
    let action = if rev.tombstone {
        "unit.destroy"
    } else if number == RevisionNum::FIRST {
        "unit.create"
    } else {
        "unit.update"
    };
    NewAudit {
        actor: rev.author.clone(),
        action,
        target: rev.unit.to_string(),
        detail: format!(
            "revision {number} digest {} origin {:?} message {:?}",
            rev.digest, rev.origin, rev.message
        ),
    }
}

/// Records a promotion whose revisions got `numbers`; returns its id and
/// its audit entry.
async fn insert_promotion(
    tx: &mut AnyConnection,
    p: NewPromotion,
    numbers: &[RevisionNum],
    now: UnixMillis,
) -> StoreResult<(u64, NewAudit)> {
    let items: Vec<PromotedUnit> = p
        .items
        .iter()
        .zip(numbers)
        .map(|(i, n)| PromotedUnit {
            target_revision: n.0,
            ..i.clone()
        })
        .collect();
    let items_json = serde_json::to_string(&items).map_err(corrupt)?;
    let pid: i64 = sqlx::query_scalar(
        "INSERT INTO promotions (time, actor, from_env, to_env, automatic, forced, reason, items)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
    )
    .bind(now.0)
    .bind(p.actor.to_string())
    .bind(p.from.as_str())
    .bind(p.to.as_str())
    .bind(i64::from(p.automatic))
    .bind(i64::from(p.forced))
    .bind(&p.reason)
    .bind(&items_json)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    let detail = items
        .iter()
        .map(|i| {
            format!(
                "{}@{} -> {}@{}",
                i.source_unit, i.source_revision, i.target_unit, i.target_revision
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let reason = if p.reason.is_empty() {
        String::new()
    } else {
        format!("; reason {:?}", p.reason)
    };
    let audit = NewAudit {
        actor: p.actor,
        action: if p.forced {
            "promotion.forced"
        } else if p.automatic {
            "promotion.auto"
        } else {
            "promotion"
        },
        target: format!("{}->{}", p.from, p.to),
        detail: format!("promotion {pid}: {detail}{reason}"),
    };
    Ok((u64::try_from(pid).unwrap_or(0), audit))
}

/// A unit another writer tried to change.
fn owned_elsewhere(unit: &UnitRef, owner: &str) -> String {
    if owner.is_empty() {
        format!(
            "unit {unit} belongs to the hub, not to a source; change it with `unitsync unit update`"
        )
    } else {
        format!("unit {unit} belongs to {owner}; change it there")
    }
}

/// Runs a statement with a `VALUES` list over `rows`, as many statements as
/// the parameter limit needs; returns the rows they return.
async fn rows_in_chunks<'r, T>(
    tx: &mut AnyConnection,
    backend: Backend,
    sql: impl Fn(&str) -> String,
    cols: usize,
    rows: &'r [T],
    weight: impl Fn(&T) -> usize,
    bind: impl Fn(
        sqlx::query::Query<'r, Any, AnyArguments>,
        &'r T,
    ) -> StoreResult<sqlx::query::Query<'r, Any, AnyArguments>>,
) -> StoreResult<Vec<AnyRow>> {
    let mut out = Vec::new();
    for chunk in chunks(rows, cols, weight) {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql(&backend.values(chunk.len(), cols))));
        for row in chunk {
            q = bind(q, row)?;
        }
        out.extend(q.fetch_all(&mut *tx).await.map_err(db)?);
    }
    Ok(out)
}

/// `rows` split so that no statement binds more than [`MAX_PARAMS`]
/// parameters or (by `weight`) [`MAX_STATEMENT_BYTES`] bytes; a row heavier
/// than that goes alone.
fn chunks<T>(rows: &[T], cols: usize, weight: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let max_rows = (MAX_PARAMS / cols).max(1);
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let w = weight(row);
        if i > start && (i - start >= max_rows || bytes + w > MAX_STATEMENT_BYTES) {
            out.push(&rows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += w;
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

/// A unit changed between planning and committing.
fn changed(unit: &UnitRef, expected: RevisionNum, head: RevisionNum) -> StoreError {
    let now = if head.0 == 0 {
        "it does not exist".to_owned()
    } else {
        format!("its head is revision {head}")
    };
    let then = if expected.0 == 0 {
        "it did not exist".to_owned()
    } else {
        format!("revision {expected}")
    };
    StoreError::Conflict(format!(
        "unit {unit} changed concurrently: planned against {then}, but {now}; nothing was committed, retry"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Actor;
    use crate::store::Store;

    use crate::store::testing::{rev, store};

    fn unit(s: &str) -> UnitRef {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_group_answers_each_request_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let promotion = NewPromotion {
            actor: Actor::Operator("tester".into()),
            from: "dev".parse().unwrap(),
            to: "dev".parse().unwrap(),
            automatic: false,
            forced: false,
            reason: String::new(),
            items: vec![PromotedUnit {
                source_unit: "dev/a".into(),
                source_revision: 1,
                target_unit: "dev/d".into(),
                target_revision: 0,
                previous_revision: 0,
            }],
        };
        let group = vec![
            (vec![rev("dev/a", "1", PutMode::CreateOrUpdate)], None),
            (vec![rev("dev/b", "1", PutMode::Update)], None),
            (vec![rev("dev/a", "2", PutMode::CreateOrUpdate)], None),
            // Atomic: `dev/a` exists (created by the first request), so `dev/c` is not created.
            (
                vec![
                    rev("dev/c", "1", PutMode::Create),
                    rev("dev/a", "x", PutMode::Create),
                ],
                None,
            ),
            // Planned against the head the group left.
            (
                vec![NewRevision {
                    expected_head: Some(RevisionNum(2)),
                    ..rev("dev/a", "3", PutMode::Update)
                }],
                None,
            ),
            (vec![rev("dev/d", "1", PutMode::Create)], Some(promotion)),
            (vec![rev("other/e", "1", PutMode::Create)], None),
        ];
        let answers = commit_group(store.writer(), Backend::Sqlite, group)
            .await
            .unwrap();
        let numbers: Vec<Result<Vec<u64>, String>> = answers
            .iter()
            .map(|a| match a {
                Ok((revs, _)) => Ok(revs.iter().map(|r| r.number.0).collect()),
                Err(e) => Err(e.to_string()),
            })
            .collect();
        assert_eq!(numbers[0], Ok(vec![1]));
        assert_eq!(numbers[1], Err("unit dev/b not found".into()));
        assert_eq!(numbers[2], Ok(vec![2]));
        assert_eq!(numbers[3], Err("unit dev/a already exists".into()));
        assert_eq!(numbers[4], Ok(vec![3]));
        assert_eq!(numbers[5], Ok(vec![1]));
        assert_eq!(numbers[6], Err("environment other not found".into()));

        let history: Vec<String> = store
            .history(&unit("dev/a"))
            .await
            .unwrap()
            .iter()
            .map(|r| format!("{}", r.number))
            .collect();
        assert_eq!(history, ["1", "2", "3"]);
        let a = store
            .get_revision(&unit("dev/a"), RevisionNum(3))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&*a.manifests, "3");
        assert!(store.get_unit(&unit("dev/c")).await.unwrap().is_none());
        assert!(store.get_unit(&unit("dev/b")).await.unwrap().is_none());

        // The promotion names the number its revision got, and its audit
        // entry follows that revision's.
        let id = answers[5].as_ref().unwrap().1.unwrap();
        let p = store.get_promotion(id).await.unwrap().unwrap();
        assert_eq!(p.items[0].target_revision, 1);
        let entries: Vec<String> = store
            .list_audit(100, "")
            .await
            .unwrap()
            .iter()
            .rev()
            .map(|e| format!("{} {}", e.action, e.target))
            .collect();
        assert_eq!(
            entries,
            [
                "environment.create env/dev",
                "unit.create dev/a",
                "unit.update dev/a",
                "unit.update dev/a",
                "unit.create dev/d",
                "promotion dev->dev",
            ]
        );
    }

    #[tokio::test]
    async fn a_group_whose_transaction_fails_writes_nothing_and_fails_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        // The last statement of the group (its audit entries) will fail.
        sqlx::raw_sql("DROP TABLE audit")
            .execute(store.writer())
            .await
            .unwrap();
        // Both requests queued before the committer runs: one group.
        let (queue, rx) = mpsc::unbounded_channel();
        let mut answers = Vec::new();
        for name in ["dev/a", "dev/b"] {
            let (reply, answer) = oneshot::channel();
            let revs = vec![rev(name, "1", PutMode::Create)];
            queue
                .send(Request {
                    revs,
                    promotion: None,
                    reply,
                })
                .unwrap();
            answers.push(answer);
        }
        drop(queue);
        run(rx, store.writer().clone(), Backend::Sqlite).await;
        for answer in answers {
            let e = answer
                .await
                .unwrap()
                .expect_err("the group's transaction failed");
            assert_eq!(e.to_string(), "database error");
            assert!(
                crate::error::ErrorChain(&e)
                    .to_string()
                    .contains("no such table: audit"),
                "{}",
                crate::error::ErrorChain(&e)
            );
        }
        assert!(store.list_units(None).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_request_the_database_refuses_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let (queue, rx) = mpsc::unbounded_channel();
        let mut answers = Vec::new();
        for (name, source_revision) in [("dev/a", 1), ("dev/b", u64::MAX), ("dev/c", 1)] {
            let (reply, answer) = oneshot::channel();
            let revs = vec![NewRevision {
                source_revision: RevisionNum(source_revision),
                ..rev(name, "1", PutMode::Create)
            }];
            let request = Request {
                revs,
                promotion: None,
                reply,
            };
            queue.send(request).unwrap();
            answers.push(answer);
        }
        drop(queue);
        // One group: its transaction fails on dev/b's number, then each
        // request goes again on its own.
        run(rx, store.writer().clone(), Backend::Sqlite).await;
        let mut results = Vec::new();
        for answer in answers {
            results.push(answer.await.unwrap().map(|(revs, _)| revs[0].number.0));
        }
        assert!(matches!(results[0], Ok(1)), "{results:?}");
        assert!(
            matches!(results[1], Err(StoreError::Corrupt(_))),
            "{results:?}"
        );
        assert!(matches!(results[2], Ok(1)), "{results:?}");
        let units: Vec<String> = store
            .list_units(None)
            .await
            .unwrap()
            .iter()
            .map(|u| u.unit.to_string())
            .collect();
        assert_eq!(units, ["dev/a", "dev/c"]);
    }

    #[test]
    fn long_or_heavy_lists_are_split_into_statements() {
        let rows: Vec<usize> = (0..10).collect();
        // By parameters: 8,000 / 1,000 columns = 8 rows a statement.
        let by_params: Vec<usize> = chunks(&rows, 1_000, |_| 0)
            .iter()
            .map(|c| c.len())
            .collect();
        assert_eq!(by_params, [8, 2]);
        // By bytes: two 20 MiB rows would pass 32 MiB, so one at a time.
        let heavy: Vec<usize> = chunks(&rows[..3], 1, |_| 20 << 20)
            .iter()
            .map(|c| c.len())
            .collect();
        assert_eq!(heavy, [1, 1, 1]);
        let light: Vec<usize> = chunks(&rows[..3], 1, |_| 10 << 20)
            .iter()
            .map(|c| c.len())
            .collect();
        assert_eq!(light, [3]);
        // A row heavier than the budget still goes (alone).
        let huge: Vec<usize> = chunks(&rows[..2], 1, |_| 64 << 20)
            .iter()
            .map(|c| c.len())
            .collect();
        assert_eq!(huge, [1, 1]);
        assert!(chunks::<usize>(&[], 1, |_| 0).is_empty());
    }
}
