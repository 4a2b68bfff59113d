//! Which items a worker starts with: shard I of N takes the items whose position in the job file
//! is I modulo N. The shard comes from `--shard I/N` or from the scheduler's environment.

use diskkit_formats::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Every item.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// `I/N` with I < N.
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = || Error::invalid(format!("--shard {s}: expected I/N with 0 <= I < N"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        Shard::new(index, count).ok_or_else(bad)
    }

    fn new(index: usize, count: usize) -> Option<Shard> {
        (count > 0 && index < count).then_some(Shard { index, count })
    }

    /// The shard the scheduler gives this process, if any: Kubernetes Indexed Jobs
    /// (`JOB_COMPLETION_INDEX`, with `shards`), Slurm job arrays (`SLURM_ARRAY_TASK_ID` from
    /// `SLURM_ARRAY_TASK_MIN` in steps of `SLURM_ARRAY_TASK_STEP`, `SLURM_ARRAY_TASK_COUNT`
    /// tasks), AWS Batch array jobs (`AWS_BATCH_JOB_ARRAY_INDEX`, with `shards` or
    /// `AWS_BATCH_JOB_ARRAY_SIZE`).
    pub fn from_env(shards: Option<usize>) -> Result<Option<Shard>> {
        Self::from_vars(&|name| std::env::var(name).ok(), shards)
    }

    fn from_vars(
        var: &dyn Fn(&str) -> Option<String>,
        shards: Option<usize>,
    ) -> Result<Option<Shard>> {
        let num = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::invalid(format!("environment variable {name}={v}: not a number"))
                }),
            }
        };
        let make = |index: usize, count: Option<usize>, from: &str| -> Result<Option<Shard>> {
            let count = count.ok_or_else(|| {
                Error::invalid(format!(
                    "{from} is set: give the number of shards (--shards N)"
                ))
            })?;
            Shard::new(index, count).map(Some).ok_or_else(|| {
                Error::invalid(format!(
                    "{from}: index {index} is not below the shard count {count}"
                ))
            })
        };
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            return make(index, shards, "JOB_COMPLETION_INDEX");
        }
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let step = num("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            let offset = id.checked_sub(min).ok_or_else(|| {
                Error::invalid("SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")
            })?;
            let count = shards.or(num("SLURM_ARRAY_TASK_COUNT")?);
            return make(offset / step, count, "SLURM_ARRAY_TASK_ID");
        }
        if let Some(index) = num("AWS_BATCH_JOB_ARRAY_INDEX")? {
            let count = shards.or(num("AWS_BATCH_JOB_ARRAY_SIZE")?);
            return make(index, count, "AWS_BATCH_JOB_ARRAY_INDEX");
        }
        Ok(None)
    }

    /// True when the item at `position` (from 0) belongs to this shard.
    pub fn contains(&self, position: usize) -> bool {
        position % self.count == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)], shards: Option<usize>) -> Result<Option<Shard>> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Shard::from_vars(
            &|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            shards,
        )
    }

    #[test]
    fn shards_from_flags_and_schedulers() {
        assert_eq!(Shard::parse("2/3").unwrap(), Shard { index: 2, count: 3 });
        assert!(Shard::parse("3/3").is_err());
        assert!(Shard::parse("1/0").is_err());
        assert!(Shard::parse("x").is_err());
        assert_eq!(env(&[], None).unwrap(), None);
        assert_eq!(
            env(&[("JOB_COMPLETION_INDEX", "4")], Some(5)).unwrap(),
            Some(Shard { index: 4, count: 5 })
        );
        assert!(env(&[("JOB_COMPLETION_INDEX", "4")], None).is_err());
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert_eq!(
            env(&slurm, None).unwrap(),
            Some(Shard { index: 2, count: 3 })
        );
        assert!(env(&[("SLURM_ARRAY_TASK_ID", "x")], None).is_err());
        assert_eq!(
            env(
                &[
                    ("AWS_BATCH_JOB_ARRAY_INDEX", "0"),
                    ("AWS_BATCH_JOB_ARRAY_SIZE", "2")
                ],
                None
            )
            .unwrap(),
            Some(Shard { index: 0, count: 2 })
        );
        let s = Shard { index: 1, count: 3 };
        assert!(s.contains(4) && !s.contains(3));
    }
}
