"""Coordinating replica groups: the Manager and its collaborators.

One outer step reads top to bottom in :mod:`.manager`: join a quorum
(:mod:`.plan` decides who heals and from whom), rebuild the process group
when the quorum changed (:mod:`.process_group`), allreduce
(:mod:`.allreduce`), vote and commit.  :mod:`.group` keeps the ranks of one
group in step; :mod:`.lost_members` forwards the lighthouse's liveness
events to them.
"""
