"""Bank transfer: class-style account entities and a critical section.

The transfer orchestration locks both accounts, checks the balance and moves the money; no other
orchestration can touch either account in between, so concurrent transfers never overdraw.

POST /api/orchestrators/bank_transfer  body: {"from": "alice", "to": "bob", "amount": 30}
"""

import durable as df

bp = df.Blueprint()


@bp.entity_trigger(context_name="context", entity_name="account")
class Account:
    """Public methods are operations; the fields are the entity's state."""

    def __init__(self) -> None:
        self.balance = 0

    def deposit(self, amount: int) -> int:
        if amount <= 0:
            raise ValueError("deposits must be positive")
        self.balance += amount
        return self.balance

    def withdraw(self, amount: int) -> int:
        if amount > self.balance:
            raise ValueError(f"insufficient funds: balance {self.balance}, asked {amount}")
        self.balance -= amount
        return self.balance

    def get(self) -> int:
        return self.balance


@bp.orchestration_trigger(context_name="context")
def bank_transfer(context: df.DurableOrchestrationContext):
    request = context.get_input()
    source = df.EntityId("account", request["from"])
    target = df.EntityId("account", request["to"])
    amount = request["amount"]
    with (yield context.lock([source, target])):
        balance = yield context.call_entity(source, "get")
        if balance < amount:
            return {"transferred": False, "balance": balance}
        yield context.call_entity(source, "withdraw", amount)
        yield context.call_entity(target, "deposit", amount)
    return {"transferred": True, "balance": balance - amount}


@bp.orchestration_trigger(context_name="context")
def bank_deposit(context: df.DurableOrchestrationContext):
    """Open or top up an account: input {"account": ..., "amount": N}."""
    request = context.get_input()
    balance = yield context.call_entity(df.EntityId("account", request["account"]), "deposit", request["amount"])
    return balance
