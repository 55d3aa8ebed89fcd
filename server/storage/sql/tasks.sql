-- The task store's gathered statements on Postgres (server/storage/taskstore/postgres.py).
--
-- Each statement serves many callers at once: their items arrive as parallel arrays
-- (unnest). States are parameters (:queued, :assigned, :running, from muster.states.State),
-- never literals. Every statement is a conditional UPDATE: a row changes only while it is
-- still in the state (and with the holder) the caller expects, so racing replicas never
-- move the same attempt twice; RETURNING says which rows this statement moved.

-- name: claim_many
-- Deal the best queued tasks of one pool, kind set and label set to several streams:
-- highest priority first, then longest waiting, round-robin over the slots (:agents and
-- :sessions, one entry per task wanted). FOR UPDATE SKIP LOCKED: replicas never wait on
-- each other and never take the same row.
WITH picked AS (
    SELECT task_id, priority, queued_at FROM tasks
    WHERE state = :queued AND pool = :pool AND kind = ANY(CAST(:kinds AS text[]))
      AND (not_before IS NULL OR not_before <= :now)
      AND CAST(selector AS jsonb) <@ CAST(:labels AS jsonb)
    ORDER BY priority DESC, queued_at, task_id
    LIMIT :total
    FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT task_id, row_number() OVER (ORDER BY priority DESC, queued_at, task_id) AS n
    FROM picked
), slots AS (
    SELECT * FROM unnest(CAST(:agents AS text[]), CAST(:sessions AS text[]))
                  WITH ORDINALITY AS s(agent_id, session_id, n)
)
UPDATE tasks SET state = :assigned, agent_id = slots.agent_id,
                 session_id = slots.session_id, lease_expires_at = :accept_by,
                 updated_at = :now
FROM ranked JOIN slots USING (n)
WHERE tasks.task_id = ranked.task_id
RETURNING tasks.session_id, tasks.task_id, tasks.attempt, tasks.kind, tasks.payload,
          tasks.pool, tasks.owner, tasks.priority, tasks.queued_at,
          tasks.start_to_close_timeout, tasks.deadline, tasks.model, tasks.reserve_micros,
          tasks.max_cost_micros, tasks.output_schema, tasks.waiting_reason,
          tasks.signature, tasks.trace_context;

-- name: accept_many
-- ASSIGNED attempts of the stream that was sent them move to RUNNING.
UPDATE tasks SET state = :running, started_at = :now, lease_expires_at = :lease,
                 updated_at = :now
FROM unnest(CAST(:ids AS text[]), CAST(:attempts AS int[]), CAST(:sessions AS text[]))
     AS v(task_id, attempt, session_id)
WHERE tasks.task_id = v.task_id AND tasks.attempt = v.attempt
  AND tasks.session_id = v.session_id AND tasks.state = :assigned
RETURNING tasks.task_id, tasks.attempt;

-- name: finish_many
-- End held attempts with their agents' Results. The columns set are those of
-- taskstore/common.py's ended_values (the one definition of the end of an attempt),
-- and the start of an attempt whose Accepted was never written (Ending.accepted_at).
UPDATE tasks SET state = v.state, output = v.output, error = v.error,
                 finished_at = :now, updated_at = :now, session_id = NULL,
                 lease_expires_at = NULL,
                 started_at = COALESCE(tasks.started_at, v.accepted_at)
FROM unnest(CAST(:ids AS text[]), CAST(:attempts AS int[]), CAST(:agents AS text[]),
            CAST(:states AS text[]), CAST(:outputs AS bytea[]), CAST(:errors AS text[]),
            CAST(:accepted AS timestamptz[]))
     AS v(task_id, attempt, agent_id, state, output, error, accepted_at)
WHERE tasks.task_id = v.task_id AND tasks.attempt = v.attempt
  AND tasks.agent_id = v.agent_id AND tasks.state IN (:assigned, :running)
-- Returns every column but payload (taskstore/common.py's ENDED_COLUMNS): what a
-- watcher of the task is sent.
RETURNING tasks.task_id, tasks.kind, tasks.pool, tasks.selector, tasks.priority,
          tasks.state, tasks.attempt, tasks.max_attempts, tasks.owner,
          tasks.submitted_by, tasks.idempotency_key, tasks.agent_id, tasks.session_id,
          tasks.lease_expires_at, tasks.not_before, tasks.output, tasks.error,
          tasks.cancel_requested, tasks.schedule_to_start_timeout,
          tasks.start_to_close_timeout, tasks.deadline, tasks.created_at,
          tasks.updated_at, tasks.queued_at, tasks.started_at, tasks.finished_at,
          tasks.input_tokens, tasks.output_tokens, tasks.cost_micros,
          tasks.cache_creation_tokens, tasks.cache_read_tokens,
          tasks.reported_cost_micros, tasks.model, tasks.reserve_micros,
          tasks.max_cost_micros, tasks.output_schema, tasks.waiting_reason,
          tasks.rate_limited, tasks.signature, tasks.trace_context;
