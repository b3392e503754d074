//! Withdrawing a command whose job the broker certainly did not take (SPEC
//! §8: accepted is never lost, and refused leaves nothing behind). Each
//! variant deletes the row the command created, only while no worker has
//! touched it yet.

use sqlx::PgConnection;
use uuid::Uuid;

/// The row a command created, to delete if its job is withdrawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undo {
    /// A queued email invitation.
    Invitation(Uuid),
    /// A queued association attempt.
    AssociationAttempt(Uuid),
    /// A queued review request.
    Review(Uuid),
    /// A pending export.
    Export(Uuid),
}

impl Undo {
    fn statement(self) -> (&'static str, Uuid) {
        match self {
            Undo::Invitation(id) => ("DELETE FROM invitations WHERE id = $1", id),
            Undo::AssociationAttempt(id) => (
                "DELETE FROM association_attempts WHERE id = $1 AND status = 'queued'",
                id,
            ),
            Undo::Review(id) => ("DELETE FROM reviews WHERE id = $1 AND state = 'queued'", id),
            Undo::Export(id) => (
                "DELETE FROM exports WHERE id = $1 AND status = 'pending'",
                id,
            ),
        }
    }

    /// Deletes the row (in the withdrawal's transaction).
    pub async fn apply(self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let (sql, id) = self.statement();
        sqlx::query(sql).bind(id).execute(conn).await?;
        Ok(())
    }
}
