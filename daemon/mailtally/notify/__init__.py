"""Tell senders (and admins) when a daily threshold is passed.

`settings` is the ``notify:`` section, `message` composes the mails from templates,
`outbox` sends the notices the store holds. Notices themselves are made elsewhere: a
batch's transaction makes its crossing notices (`thresholds.CrossingJudge`), and the
outbox thread makes the previous day's after ``notify.daily_at``.
"""
