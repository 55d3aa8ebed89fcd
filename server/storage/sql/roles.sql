-- Least-privilege roles for Muster on Postgres.
--
-- Applied by `muster db roles --owner-role OWNER --app-role APP`, which fills in the two
-- role names (lower-case letters, digits and '_') and runs this file in one transaction;
-- `muster db roles --print` shows the result. Safe to apply again. Run it as a superuser
-- connected to Muster's own database: every table in its public schema goes to OWNER.
--
--   OWNER  owns the schema and its tables and runs `muster db upgrade`.
--   APP    is what `muster server` connects as: it reads and writes the operational
--          tables, but may only INSERT and SELECT audit_events (and only SELECT the
--          schema version). A trigger refuses UPDATE, DELETE and TRUNCATE of
--          audit_events to everybody, OWNER and superusers included.
--
-- This file: OWNER = "{owner}", APP = "{app}".

-- The roles: created if missing (LOGIN; passwords are set separately, pre-hashed).
-- Existing roles are used as they are, unless that would defeat the point.
DO $$
DECLARE
    role_row record;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{owner}') THEN
        CREATE ROLE "{owner}" LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{app}') THEN
        CREATE ROLE "{app}" LOGIN;
    END IF;
    FOR role_row IN
        SELECT rolname FROM pg_roles
        WHERE rolname IN ('{owner}', '{app}') AND (rolsuper OR rolbypassrls)
    LOOP
        RAISE EXCEPTION 'role % is a superuser or bypasses row security: pick another', role_row.rolname;
    END LOOP;
    IF pg_has_role('{app}', '{owner}', 'USAGE') THEN
        RAISE EXCEPTION 'role {app} is a member of {owner} and would have its privileges';
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{app}' AND (rolcreaterole OR rolcreatedb)) THEN
        RAISE EXCEPTION 'role {app} may create roles or databases: pick another';
    END IF;
END
$$;

-- The database: both roles may connect.
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO "{owner}", "{app}"', current_database());
END
$$;

-- The schema: {owner} owns it and creates in it; {app} may only use what is there.
ALTER SCHEMA public OWNER TO "{owner}";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO "{app}";

-- Tables and functions made before {owner} existed (say by migrating as a superuser)
-- become {owner}'s, so that the trigger, not ownership, is what protects the audit trail.
DO $$
DECLARE
    object_row record;
BEGIN
    FOR object_row IN
        SELECT c.relname FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
          AND c.relowner <> '{owner}'::regrole
          AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
    LOOP
        EXECUTE format('ALTER TABLE public.%I OWNER TO "{owner}"', object_row.relname);
    END LOOP;
    FOR object_row IN
        SELECT p.oid::regprocedure AS signature FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.proowner <> '{owner}'::regrole
          AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO "{owner}"', object_row.signature);
    END LOOP;
END
$$;

-- {app}'s privileges on what exists now, and on whatever later migrations create.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{app}";
REVOKE TRUNCATE, REFERENCES, TRIGGER ON ALL TABLES IN SCHEMA public FROM "{app}";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{app}";
ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO "{app}";
ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO "{app}";

-- Except: audit_events is append-only and the schema version is the migrations' own.
-- (The migration that creates either applies the same rule, whichever runs first.)
DO $$
BEGIN
    IF to_regclass('public.audit_events') IS NOT NULL THEN
        REVOKE UPDATE, DELETE ON public.audit_events FROM "{app}";
    END IF;
    IF to_regclass('public.alembic_version') IS NOT NULL THEN
        REVOKE INSERT, UPDATE, DELETE ON public.alembic_version FROM "{app}";
    END IF;
END
$$;
