"""What one value of a record may be: ingest refuses more (:mod:`pipeline.bounds`), so the plugin keeps
within them and the configuration refuses a name past them (no import here: the configuration is read first).
"""

#: entries of any one list or map a record may hold (task prefixes of a job, packages of an environment,
#: tasks by state)
MAX_ITEMS = 10_000
#: UTF-8 bytes of any one string a record may hold
MAX_STRING_BYTES = 2_048
#: the largest count, number of seconds or bytes a record may hold: past anything a cluster measures
#: (9.0e15 tasks, 285 million years, 8 PiB), and every value a float holds exactly; sums of them neither
#: overflow a report's exact integers nor reach infinity
MAX_NUMBER = 2**53
